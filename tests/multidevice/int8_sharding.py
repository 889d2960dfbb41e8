"""int8 buffers and their block scales under sharding on 8 virtual CPU devices; prints JSON.

Run by ``tests/test_int8.py`` in a subprocess (the device count is fixed before JAX is
imported). For each case: the specs of codes and scales, the collectives in the compiled
update (an all-gather of a buffer would show here), and whether the sharded run equals the
one-device run bit for bit.

    python tests/multidevice/int8_sharding.py
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

# Shards of 2048 / 8 = 256 entries: whole int8 blocks, so scales shard with their codes.
SHAPES = {"wide": (64, 2048), "tall": (2048, 64), "bias": (2048,)}
SPECS = {"wide": P(None, "model"), "tall": P("model", None), "bias": P("model")}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")


def transforms(dtype):
  if dtype == "float32":  # the same transforms in float32: the collectives int8 must not add
    return {"momentum": flora_optax.flora_momentum(8, 0.9, 2),
            "two_sided": flora_optax.flora_momentum(8, 0.9, None, sketch="two_sided"),
            "int8_ema": optax.ema(0.9)}
  return {
      "momentum": flora_optax.flora_momentum(8, 0.9, 2, dtype="int8", plain_dtype="int8"),
      "two_sided": flora_optax.flora_momentum(8, 0.9, None, sketch="two_sided", dtype="int8",
                                              plain_dtype="int8"),
      "int8_ema": flora_optax.int8_ema(0.9),
  }


def collectives(step, *args):
  hlo = step.lower(*args).compile().as_text()
  return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES}


def steps_apart(a, b):
  """Largest difference of two stored int8 buffers, in quantization steps of `b`'s scales."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a, is_leaf=flora_optax.Int8Blocks.__instancecheck__),
                  jax.tree.leaves(b, is_leaf=flora_optax.Int8Blocks.__instancecheck__)):
    if isinstance(y, flora_optax.Int8Blocks):
      step = np.repeat(np.asarray(y.scale) / 127, y.block, axis=-1)[..., :y.q.shape[-1]]
      diff = np.abs(np.asarray(x.q, np.float64) * step - np.asarray(y.q, np.float64) * step)
      worst = max(worst, float(np.max(diff / np.where(step > 0, step, 1))))
  return worst


def run(tx, grads, params, in_shardings=None):
  if in_shardings is None:
    step = jax.jit(tx.update)
    state = tx.init(params)
  else:
    state_sh, grad_sh = in_shardings
    step = jax.jit(tx.update, in_shardings=(grad_sh, state_sh), out_shardings=(grad_sh, state_sh))
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
  outs = []
  for g in grads:
    out, state = step(g, state)
    outs.append(out)
  return outs, state, step


def main():
  mesh = Mesh(np.array(jax.devices()), ("model",))
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
           for _ in range(3)]
  param_sh = {k: NamedSharding(mesh, v) for k, v in SPECS.items()}
  results = {}
  float32 = transforms("float32")
  for name, tx in transforms("int8").items():
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      state_sh = flora_optax.state_shardings(tx, params, param_sh)
    specs = {}
    for path, s in jax.tree_util.tree_flatten_with_path(state_sh)[0]:
      specs[jax.tree_util.keystr(path)] = str(s.spec)
    sharded_grads = [jax.device_put(g, param_sh) for g in grads]
    outs, state, step = run(tx, sharded_grads, params, (state_sh, param_sh))
    ref_outs, ref_state, _ = run(tx, grads, params)
    _, f_state, f_step = run(float32[name], sharded_grads[:1], params, (
        flora_optax.state_shardings(float32[name], params, param_sh), param_sh))
    equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves((outs, state)), jax.tree.leaves((ref_outs, ref_state))))
    actual = {jax.tree_util.keystr(p): str(x.sharding.spec)
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    out_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(outs), jax.tree.leaves(ref_outs)))
    results[name] = {"specs": specs, "actual": actual, "equal": equal,
                     "collectives": collectives(step, sharded_grads[0], state),
                     "float32_collectives": collectives(f_step, sharded_grads[0], f_state),
                     "steps_apart": steps_apart(state, ref_state), "max_output_diff": out_diff,
                     "warnings": [str(w.message) for w in caught]}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
