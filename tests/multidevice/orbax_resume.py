"""A small Flora training run that is checkpointed with orbax and resumed elsewhere.

``tests/test_orbax.py`` imports it to run the uninterrupted training and save a checkpoint
mid-cycle, then runs it as a script, in a new process, to restore that checkpoint and go on:

    python tests/multidevice/orbax_resume.py CKPT_ROOT OUT.npz            # one device
    python tests/multidevice/orbax_resume.py CKPT_ROOT OUT.npz --devices 8  # sharded

With ``--devices 8`` the process has 8 virtual CPU devices and restores the state sharded
(FSDP-style, with :func:`flora_optax.state_shardings`) instead of on one device.
"""

import os
import sys

if __name__ == "__main__" and "--devices" in sys.argv:
  # Must happen before JAX is imported.
  _count = sys.argv[sys.argv.index("--devices") + 1]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_count}")

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

SHAPES = {"w1": (16, 32), "b1": (32,), "stack": (2, 32, 16), "w2": (32, 8)}
AXES = {"w1": None, "b1": None, "stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0),
        "w2": None}
# FSDP-style specs for the sharded restore (8 divides every sharded size).
FSDP_SPECS = {"w1": P(None, "data"), "b1": P("data"), "stack": P(None, "data", None),
              "w2": P("data", None)}

# name: (optimizer, micro-step at which it is saved, total micro-steps)
CONFIGS = {
    # Momentum resampled every 4 updates: saved after 6 (count 6), so the resample at
    # count 8 happens after the restore.
    "momentum": (lambda: flora_optax.flora_adafactor(
        1e-2, rank=4, momentum=0.9, kappa=4, min_dim_size_to_factor=8, axes=AXES), 6, 11),
    # Accumulation over 3 micro-steps, saved after micro-step 7 (one micro-gradient in the
    # compressed accumulator); its inner momentum is resampled every 2 updates.
    "accumulate": (lambda: flora_optax.flora_accumulate(flora_optax.flora_adafactor(
        1e-2, rank=4, momentum=0.9, kappa=2, min_dim_size_to_factor=8, axes=AXES), 3, 4,
        axes=AXES), 7, 13),
    # AdamW whose first moment is a two-sided sketch, resampled every 4 steps (at 8, after
    # the restore at 6): the re-sketch through the reconstruction's factors must resume too.
    "adamw_two_sided": (lambda: flora_optax.flora_adamw(
        1e-2, rank=4, kappa=4, sketch="two_sided", axes=AXES), 6, 11),
    # Online factors: the momentum and a wrapping accumulator (A kept across cycles).
    "factors": (lambda: flora_optax.flora_accumulate(flora_optax.flora_adamw(
        1e-2, rank=4, sketch="factors", axes=AXES), 3, 4, sketch="factors", axes=AXES), 7, 13),
}


def init_params():
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32)
          for k, s in SHAPES.items()}


def batch(step):
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((8, 16)).astype(np.float32)
  return x, np.sin(x[:, :8]).astype(np.float32)


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  for layer in range(SHAPES["stack"][0]):
    h = h + jnp.tanh(h @ params["stack"][layer] @ params["stack"][layer].T)
  return jnp.mean((h @ params["w2"] - y) ** 2)


def make_step(tx):
  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def run(step, params, opt_state, start, stop):
  """Micro-steps start..stop-1; returns the final params, state and params after each."""
  trajectory = []
  for i in range(start, stop):
    params, opt_state = step(params, opt_state, *batch(i))
    trajectory.append(params)
  return params, opt_state, trajectory


def flat(name, trajectory, opt_state):
  """Arrays to compare, keyed by config, step (or 'state') and leaf index."""
  out = {}
  for t, params in enumerate(trajectory):
    for j, leaf in enumerate(jax.tree.leaves(params)):
      out[f"{name}/{t}/{j}"] = np.asarray(leaf)
  for j, leaf in enumerate(jax.tree.leaves(opt_state)):
    out[f"{name}/state/{j}"] = np.asarray(leaf)
  return out


def restore_and_continue(ckpt_root, devices):
  """Restores every config's checkpoint and runs it to the end."""
  results = {}
  for name, (make_tx, save_at, total) in CONFIGS.items():
    tx = make_tx()
    params = init_params()
    abstract = {"params": jax.eval_shape(lambda p: p, params),
                "opt_state": jax.eval_shape(tx.init, params)}
    if devices > 1:
      mesh = Mesh(np.array(jax.devices()), ("data",))
      param_shardings = {k: NamedSharding(mesh, v) for k, v in FSDP_SPECS.items()}
      shardings = {"params": param_shardings,
                   "opt_state": flora_optax.state_shardings(tx, params, param_shardings)}
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(os.path.join(ckpt_root, name), abstract)
    if devices > 1:
      # The compressed buffer of the stack keeps the FSDP sharding of its rows.
      is_momentum = lambda x: isinstance(x, flora_optax.FloraMomentumState)  # noqa: E731
      momentum = next(s for s in jax.tree.leaves(restored["opt_state"], is_leaf=is_momentum)
                      if is_momentum(s))
      # (the projection's "c", the two-sided sketch's range sketch or the factor B: all keep
      # the rows)
      parts = momentum.compressed_mu["stack"].parts
      spec = next(parts[k] for k in ("c", "range", "b") if k in parts).sharding.spec
      results[f"{name}/stack_spec"] = np.asarray(str(spec))
    _, opt_state, trajectory = run(make_step(tx), restored["params"], restored["opt_state"],
                                   save_at, total)
    results.update(flat(name, trajectory, opt_state))
  return results


def main():
  ckpt_root, out_path = sys.argv[1], sys.argv[2]
  devices = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 1
  assert jax.device_count() == devices, jax.devices()
  np.savez(out_path, **restore_and_continue(ckpt_root, devices))


if __name__ == "__main__":
  main()
