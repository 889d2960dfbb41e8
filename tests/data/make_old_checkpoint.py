"""Writes orbax checkpoints of Flora states as an older flora_optax wrote them (test fixtures).

Run once per version with that version importable (its editable install, if any, hidden):

    git worktree add /tmp/old <commit>   # 58baafd~1: 0.1.0; f876efa: 0.2.0.dev0 before layout
    python -c "import sys, runpy; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; sys.path.insert(0, '/tmp/old'); sys.argv[1:] = ['tests/data/<name>']; runpy.run_path('tests/data/make_old_checkpoint.py', run_name='__main__')"

Each transform of ``transforms()`` takes ``SAVE_AT`` updates from fixed gradients; its state
and the params are saved, then ``AFTER`` more updates are recorded in ``updates.npz``, so
that a later version restoring the checkpoint can check it continues the same run.
``tests/test_orbax.py`` reads them.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import flora_optax

SAVE_AT, AFTER = 3, 3


def params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {"w": jax.random.normal(keys[0], (24, 16)), "b": jax.random.normal(keys[1], (16,))}


def grads(step):
  keys = jax.random.split(jax.random.key(100 + step), 2)
  return {"w": jax.random.normal(keys[0], (24, 16)), "b": jax.random.normal(keys[1], (16,))}


def transforms(**options):
  """The transforms, built with `options` (0.1 wrote them with its defaults)."""
  return {"momentum": flora_optax.flora_momentum(4, 0.9, kappa=2, seed=1, **options),
          "accumulate": flora_optax.flora_accumulate(optax.sgd(0.1), 2, 4, seed=1, **options)}


def main(out):
  out = pathlib.Path(out).resolve()
  recorded = {}
  for name, tx in transforms().items():
    p, state = params(), tx.init(params())
    for step in range(SAVE_AT):
      _, state = tx.update(grads(step), state, p)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(out / name, {"params": p, "opt_state": state})
    for step in range(SAVE_AT, SAVE_AT + AFTER):
      updates, state = tx.update(grads(step), state, p)
      for leaf, value in updates.items():
        recorded[f"{name}/{step}/{leaf}"] = np.asarray(value)
  np.savez(out / "updates.npz", **recorded)
  print(f"flora_optax {flora_optax.__version__}: wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1])
