"""Measures Flora under sharding on 8 virtual CPU devices; prints one JSON object.

Run by ``tests/test_sharding.py`` in a subprocess, because the device count must be fixed
before JAX is imported (the rest of the suite keeps one device). Every measurement is
returned to the test, which makes the assertions. Run it by hand to see the numbers:

    python tests/multidevice/check_sharding.py
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

# pylint: disable=wrong-import-position
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

RANK = 8
SHAPES = {
    "tall": (128, 64),     # compressed side: columns (64); the rows stay sharded under FSDP
    "wide": (64, 128),     # compressed side: rows (64); the columns stay sharded under TP
    "stack": (2, 64, 32),  # a scanned stack, one (64, 32) matrix per layer
    "bias": (64,),
}
AXES = {"stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0)}


def axes_fn(params):
  return {k: AXES.get(k) for k in params}


def meshes():
  devices = np.array(jax.devices())
  return {
      # FSDP: parameters sharded along their first matrix axis.
      "fsdp": (Mesh(devices, ("data",)),
               {"tall": P("data", None), "wide": P("data", None),
                "stack": P(None, "data", None), "bias": P()}),
      # Tensor parallel: sharded along the output axis.
      "tp": (Mesh(devices, ("model",)),
             {"tall": P(None, "model"), "wide": P(None, "model"),
              "stack": P(None, None, "model"), "bias": P("model")}),
      # 2-D mesh: both.
      "2d": (Mesh(devices.reshape(2, 4), ("data", "model")),
             {"tall": P("data", "model"), "wide": P("data", "model"),
              "stack": P(None, "data", "model"), "bias": P("model")}),
  }


def make_tx():
  # Momentum (resampled every 2 updates), factored second moments and compressed
  # accumulation over 2 micro-steps: every kind of Flora buffer in one state. The projection
  # for both (the accumulation's default is the two-sided sketch, checked further down).
  return flora_optax.flora_accumulate(flora_optax.flora_adafactor(
      learning_rate=1e-2, rank=RANK, momentum=0.9, kappa=2, min_dim_size_to_factor=16,
      axes=axes_fn), 2, RANK, axes=axes_fn, sketch="projection")


def loss_fn(params, x):
  h = jnp.tanh(x @ params["tall"])                              # (b, 64)
  h = jnp.tanh(h @ params["wide"][:, :64] + params["bias"])     # (b, 64)
  for layer in range(SHAPES["stack"][0]):
    h = jnp.tanh(h @ params["stack"][layer] @ params["stack"][layer].T)
  return jnp.mean(h ** 2)


def opt_step(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


FULL_SHAPE_RE = re.compile(r"(\w+)\[([\d,]*)\]")


def full_allgathers(hlo: str, shapes) -> list[str]:
  """HLO lines with an all-gather whose result has one of `shapes` (a full weight)."""
  wanted = {tuple(s) for s in shapes if len(s) >= 2}
  hits = []
  for line in hlo.splitlines():
    if "all-gather" not in line or "=" not in line:
      continue
    result = line.split("=", 1)[1].split("all-gather", 1)[0]
    for _, dims in FULL_SHAPE_RE.findall(result):
      if dims and tuple(int(d) for d in dims.split(",")) in wanted:
        hits.append(line.strip())
  return hits


def log(msg, t0=[None]):  # noqa: B006
  import sys, time  # pylint: disable=import-outside-toplevel,multiple-imports
  now = time.perf_counter()
  if t0[0] is not None:
    print(f"{msg}: {now - t0[0]:.1f}s", file=sys.stderr)
  t0[0] = now


def main():
  assert jax.device_count() == 8, jax.devices()
  # Compiling is most of the cost here; XLA optimisations change nothing that is measured.
  jax.config.update("jax_disable_most_optimizations", True)
  rng = np.random.default_rng(0)
  params0 = {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32)
             for k, s in SHAPES.items()}
  batches = [jnp.asarray(rng.standard_normal((16, 128)), jnp.float32) for _ in range(6)]
  tx = make_tx()
  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = [grad_fn(params0, x) for x in batches]

  # Reference: one device, no sharding at all.
  step = jax.jit(lambda g, s, p: opt_step(tx, g, s, p))
  params, state = params0, tx.init(params0)
  for g in grads:
    params, state = step(g, state, params)
  reference = (params, state)
  log("start"); log("reference")

  structs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()
             if k != "bias"}
  makers = {projection: functools.partial(
      flora_optax.projections, structs, RANK, 3, 7, axes={k: AXES.get(k) for k in structs},
      projection=projection) for projection in ("gaussian", "rademacher")}
  unsharded = {projection: jax.jit(make)() for projection, make in makers.items()}

  results = {"control_allgathers": None}
  for name, (mesh, specs) in meshes().items():
    p_shard = {k: NamedSharding(mesh, v) for k, v in specs.items()}
    s_shard = flora_optax.state_shardings(tx, params0, p_shard)
    sharded_step = jax.jit(lambda g, s, p: opt_step(tx, g, s, p),
                           in_shardings=(p_shard, s_shard, p_shard),
                           out_shardings=(p_shard, s_shard))
    params = jax.device_put(params0, p_shard)
    state = jax.jit(tx.init, out_shardings=s_shard)(params)
    log(f"{name} setup")
    compiled = sharded_step.lower(grads[0], state, params).compile()
    hlo = compiled.as_text()
    log(f"{name} compile")
    for g in grads:
      params, state = compiled(jax.device_put(g, p_shard), state, params)

    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
        if np.size(a) else 0.0, (params, state), reference)
    acc = state.compressed_acc
    momentum = next(s for s in state.inner_opt_state
                    if isinstance(s, flora_optax.FloraMomentumState))
    buffers = {}
    for kind, tree in (("accumulator", acc), ("momentum", momentum.compressed_mu)):
      for leaf_name, buf in tree.items():
        buf = buf.parts["c"] if isinstance(buf, flora_optax.Compressed) else buf
        buffers[f"{kind}/{leaf_name}"] = {
            "shape": list(buf.shape),
            "spec": [list(e) if isinstance(e, tuple) else e for e in buf.sharding.spec],
            "total_bytes": int(buf.nbytes),
            "per_device_bytes": max(int(s.data.nbytes) for s in buf.addressable_shards),
        }
    results[name] = {
        "mesh": dict(mesh.shape),
        "max_abs_diff": max(jax.tree.leaves(diffs)),
        "max_abs_params": max(float(np.max(np.abs(p))) for p in jax.tree.leaves(params)),
        "buffers": buffers,
        "full_allgathers": full_allgathers(hlo, SHAPES.values()),
        "allgather_count": hlo.count(" all-gather("),
    }

    # Projections: the same numbers however the output is sharded. (Compared with an
    # unsharded jit: eager and jitted Gaussians may differ by an ulp, since XLA fuses the
    # 1/sqrt(rank) scaling into the sampler differently; the random bits are the same.)
    equal = {}
    for projection, make in makers.items():
      out_specs = {"tall": P(None, mesh.axis_names[-1]), "wide": P(mesh.axis_names[0], None),
                   "stack": P(None, None, mesh.axis_names[-1])}
      sharded = jax.jit(make, out_shardings={k: {"a": NamedSharding(mesh, v)}
                                             for k, v in out_specs.items()})()
      equal[projection] = all(
          bool(np.array_equal(np.asarray(unsharded[projection][k]["a"]),
                              np.asarray(sharded[k]["a"])))
          and not sharded[k]["a"].sharding.is_fully_replicated for k in structs)
    results[name]["projections_equal"] = equal
    log(f"{name} rest")

  # The two-sided sketch and the online factors (flora_adamw's first moment; the sketch
  # resampled every 2 steps) under each mesh: equal to one device, and no full weight gathered
  # (their QRs and small solves work on (N, k), (l, k) and (k, k) matrices).
  for sketch in ("two_sided", "factors"):
    tx2 = flora_optax.flora_adamw(1e-2, RANK, kappa=2, sketch=sketch, axes=axes_fn)
    step2 = jax.jit(lambda g, s, p: opt_step(tx2, g, s, p))
    params, state = params0, tx2.init(params0)
    for g in grads:
      params, state = step2(g, state, params)
    reference2 = params
    for name, (mesh, specs) in meshes().items():
      p_shard = {k: NamedSharding(mesh, v) for k, v in specs.items()}
      s_shard = flora_optax.state_shardings(tx2, params0, p_shard)
      sharded = jax.jit(lambda g, s, p: opt_step(tx2, g, s, p),
                        in_shardings=(p_shard, s_shard, p_shard),
                        out_shardings=(p_shard, s_shard))
      params = jax.device_put(params0, p_shard)
      state = jax.jit(tx2.init, out_shardings=s_shard)(params)
      compiled = sharded.lower(grads[0], state, params).compile()
      for g in grads:
        params, state = compiled(jax.device_put(g, p_shard), state, params)
      results[name][sketch] = {
          "max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree.leaves(params),
                                              jax.tree.leaves(reference2))),
          "full_allgathers": full_allgathers(compiled.as_text(), SHAPES.values())}
    log(sketch)

  # Control for the all-gather detector: gathering a sharded weight must be seen.
  mesh, _ = meshes()["fsdp"]
  gather = jax.jit(lambda w: w * 2, in_shardings=NamedSharding(mesh, P("data", None)),
                   out_shardings=NamedSharding(mesh, P()))
  control_hlo = gather.lower(params0["tall"]).compile().as_text()
  results["control_allgathers"] = full_allgathers(control_hlo, SHAPES.values())
  print(json.dumps(results))


if __name__ == "__main__":
  main()
