"""CPU cost of Flora's levers: projection kind, matmul precision, PRNG implementation.

For a tree of GPT-2-small-shaped transformer blocks (default: 2 blocks of width 768, the
embeddings left out to keep CPU time short; ``--layers``/``--width`` change it) and rank
``--rank``, measures per step, with the variants of a measurement timed side by side by
``_harness.time_interleaved`` (median and interquartile range over rounds, and the median of
per-round ratios to the first variant):

1. generating the projections of every compressed leaf (``flora_optax.projections``,
   jitted, cycle passed as a traced argument): gaussian vs rademacher vs orthogonal, and
   gaussian with ``prng_impl="threefry2x32"`` vs ``"rbg"``;
2. one ``flora_momentum`` update (jitted) with each projection kind and each PRNG impl,
   next to ``optax.ema`` (the uncompressed EMA it replaces);
3. ``precision=DEFAULT`` vs ``HIGHEST`` for the projection matmuls: time of the update and
   relative error of the emitted update against a float64 NumPy reference computed from
   the same projection matrices.

Predictions are written in ``PREDICTIONS`` before any measurement and printed next to
each outcome.

    python -m benchmarks.levers            # ~3-6 min on 2 busy CPU cores
    python -m benchmarks.levers --quick    # tiny tree, seconds

Writes ``levers.json``, ``levers.md`` and ``SECTION.md`` (for docs/benchmarks.md) into
``benchmarks/results/levers/`` (``--quick``: ``benchmarks/results/levers-quick/``; or ``--out``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax
from benchmarks import _harness

# Written before the first measurement (CPU, rank 64, blocks of width 768). "ratio" is to the
# first variant of the same measurement.
PREDICTIONS = {
    "generate/rademacher": "0.5-0.8x gaussian: same threefry bits, no normal transform "
                           "(erfinv) on top",
    "generate/orthogonal": "1.5-4x gaussian: a Householder QR of each (d, r) Gaussian after "
                           "drawing it (2·d·r² flops, serial-ish LAPACK on CPU)",
    "generate/rbg": "0.3-0.6x threefry: XLA's RngBitGenerator is cheaper per bit than "
                    "threefry's 20 rounds",
    "update/rademacher": "within 5% of gaussian: generation is a few % of the update, the "
                         "two (n, m)x(m, r) matmuls dominate",
    "update/orthogonal": "1.05-1.2x gaussian: the QR shows, but the matmuls still dominate",
    "update/rbg": "within 5% of threefry, for the same reason",
    "update/ema": "0.2-0.5x the Flora update (Flora: 4·n·m·r flops per leaf vs an "
                  "elementwise EMA)",
    "precision/HIGHEST time": "same as DEFAULT on CPU (both run true fp32 dots on CPU); on "
                              "GPU DEFAULT may use TF32/bf16 passes, HIGHEST costs 3-6x "
                              "the matmul",
    "precision/error": "DEFAULT and HIGHEST alike on CPU, relative error ~1e-6 (fp32 "
                       "accumulation over d <= 3072); on an H100 DEFAULT (TF32) would be ~1e-3",
}


def block_tree(layers, width, seed=0):
  """GPT-2 blocks of the given width without the embeddings, every leaf N(0, 1)."""
  size = _harness.GPT2Size(layers=layers, width=width, heads=1)
  return _harness.random_tree(_harness.gpt2_shapes(size, embeddings=False), seed, scale=1.0,
                              like_params=False)


def interleaved(variants, reps, warmup=2):
  """variants: {name: zero-arg callable}; stats relative to the first variant."""
  timings = _harness.time_interleaved(variants, reps, warmup=warmup)
  base = timings[next(iter(variants))]
  return {name: t.summary(base) for name, t in timings.items()}


def reference_error(tx, grads, rank, projection, prng_impl, decay):
  """Relative error of flora_momentum's first emitted update vs float64 NumPy."""
  state = tx.init(grads)
  out, _ = jax.jit(tx.update)(grads, state)
  mats = flora_optax.projections(grads, rank, 0, projection=projection, prng_impl=prng_impl)
  num = den = 0.0
  for g, a, o in zip(jax.tree.leaves(grads), jax.tree.leaves(mats, is_leaf=lambda x: x is None),
                     jax.tree.leaves(out)):
    if a is None:
      continue
    g64, a64 = np.asarray(g, np.float64), np.asarray(a, np.float64)
    n, m = g64.shape
    if n < m:  # side "rows": C = A G, out = Aᵀ C
      ref = (1 - decay) * a64.T @ (a64 @ g64)
    else:  # side "cols": C = G Aᵀ, out = C A
      ref = (1 - decay) * (g64 @ a64.T) @ a64
    num += float(np.sum((np.asarray(o, np.float64) - ref) ** 2))
    den += float(np.sum(ref ** 2))
  return (num / den) ** 0.5


def main():
  ap = _harness.arg_parser(__doc__, "a tiny tree, 3 repetitions")
  ap.add_argument("--layers", type=int, default=None)
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--rank", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  args = ap.parse_args()
  q = args.quick
  layers = args.layers or (1 if q else 2)
  width = args.width or (128 if q else 768)
  rank = args.rank or (16 if q else 64)
  reps = args.reps or (3 if q else 15)
  out_dir = _harness.results_dir("levers", q, args.out)
  t_start = time.perf_counter()
  decay = 0.9

  grads = block_tree(layers, width)
  n_params = sum(x.size for x in jax.tree.leaves(grads))
  info = _harness.machine_info()
  results = dict(tree=dict(layers=layers, width=width, params=n_params), rank=rank, reps=reps,
                 predictions=PREDICTIONS, measurements={})
  print(f"tree: {layers} GPT-2 blocks of width {width} ({n_params / 1e6:.1f}M params, "
        f"no embeddings), rank {rank}, {reps} interleaved reps; {info['cpu']}, "
        f"{info['cpu_count']} cores", flush=True)

  # 1. Projection generation.
  def gen(projection, prng_impl="threefry2x32"):
    f = jax.jit(lambda cycle: flora_optax.projections(
        grads, rank, cycle, projection=projection, prng_impl=prng_impl))
    cycle = jnp.asarray(3, jnp.int32)
    return lambda: f(cycle)

  results["measurements"]["generate"] = interleaved(
      {"gaussian": gen("gaussian"), "rademacher": gen("rademacher"),
       "orthogonal": gen("orthogonal"), "rbg": gen("gaussian", "rbg")}, reps)
  print("generate:", {k: round(v["ratio"], 2) for k, v in
                      results["measurements"]["generate"].items()}, flush=True)

  # 2. flora_momentum update per projection kind and PRNG impl (and optax.ema).
  def upd(tx):
    state = tx.init(grads)
    f = jax.jit(tx.update)
    return lambda: f(grads, state)

  mk = lambda **kw: flora_optax.flora_momentum(rank, decay, kappa=1000, **kw)  # noqa: E731
  results["measurements"]["update"] = interleaved(
      {"gaussian": upd(mk()), "rademacher": upd(mk(projection="rademacher")),
       "orthogonal": upd(mk(projection="orthogonal")), "rbg": upd(mk(prng_impl="rbg")),
       "ema": upd(optax.ema(decay, debias=False))}, reps)
  print("update:", {k: round(v["ratio"], 2) for k, v in
                    results["measurements"]["update"].items()}, flush=True)

  # 3. Precision: time and error against float64.
  hi = jax.lax.Precision.HIGHEST
  de = jax.lax.Precision.DEFAULT
  results["measurements"]["precision"] = interleaved(
      {"DEFAULT": upd(mk(precision=de)), "HIGHEST": upd(mk(precision=hi))}, reps)
  errors = {}
  for pname, p in (("DEFAULT", de), ("HIGHEST", hi)):
    for proj in ("gaussian", "orthogonal"):
      errors[f"{pname}/{proj}"] = reference_error(
          mk(precision=p, projection=proj), grads, rank, proj, "threefry2x32", decay)
  results["measurements"]["precision_error"] = errors
  print("precision:", {k: round(v["ratio"], 2) for k, v in
                       results["measurements"]["precision"].items()}, errors, flush=True)
  results["wall_s"] = time.perf_counter() - t_start

  md = markdown(results)
  _harness.write_report(out_dir, "levers", results, md, info)
  (out_dir / "SECTION.md").write_text(section(results, md, info))
  print(md)
  print(f"wrote {out_dir} in {results['wall_s']:.0f}s")


def _row(name, s, pred):
  return (f"| {name} | {s['ms']:.2f} ({s['ms_p25']:.2f}-{s['ms_p75']:.2f}) | "
          f"{s['ratio']:.2f} ({s['ratio_p25']:.2f}-{s['ratio_p75']:.2f}) | {pred} |")


def markdown(r):
  m = r["measurements"]
  P = r["predictions"]
  lines = ["| measurement | ms (p25-p75) | ratio (p25-p75) | prediction (written first) |",
           "| --- | --- | --- | --- |"]
  g = m["generate"]
  lines.append(_row("generate, gaussian (threefry)", g["gaussian"], "baseline"))
  lines.append(_row("generate, rademacher", g["rademacher"], P["generate/rademacher"]))
  lines.append(_row("generate, orthogonal", g["orthogonal"], P["generate/orthogonal"]))
  lines.append(_row("generate, gaussian, `rbg`", g["rbg"], P["generate/rbg"]))
  u = m["update"]
  lines.append(_row("flora_momentum update, gaussian", u["gaussian"], "baseline"))
  lines.append(_row("update, rademacher", u["rademacher"], P["update/rademacher"]))
  lines.append(_row("update, orthogonal", u["orthogonal"], P["update/orthogonal"]))
  lines.append(_row("update, gaussian, `rbg`", u["rbg"], P["update/rbg"]))
  lines.append(_row("`optax.ema` (uncompressed)", u["ema"], P["update/ema"]))
  p = m["precision"]
  lines.append(_row("update, precision DEFAULT", p["DEFAULT"], "baseline"))
  lines.append(_row("update, precision HIGHEST", p["HIGHEST"], P["precision/HIGHEST time"]))
  lines += ["", "Relative error of the emitted update (first step) against float64 NumPy "
            "with the same projection matrices (prediction: " + P["precision/error"] + "):", "",
            "| precision / projection | relative error |", "| --- | --- |"]
  lines += [f"| {k} | {v:.2e} |" for k, v in m["precision_error"].items()]
  gen_share = g["gaussian"]["ms"] / u["gaussian"]["ms"]
  lines += ["", f"Projection generation is {100 * gen_share:.0f}% of the gaussian "
            "flora_momentum update time (measured separately, same tree)."]
  return "\n".join(lines) + "\n"


def section(r, md, e):
  t = r["tree"]
  return (
      "## Levers on CPU: projection kind, precision, PRNG\n\n"
      f"Command: `{_harness.command_line()}` ({r['wall_s']:.0f} s wall). CPU: {e['cpu']}, "
      f"{e['cpu_count']} cores (shared with other jobs, load average "
      f"{', '.join(f'{x:.1f}' for x in e['load_avg']) if e['load_avg'] else 'n/a'} at the "
      f"start: timings are noisy, compare ratios, which were measured interleaved). "
      f"jax {e['jax']}, optax {e['optax']}, flora_optax {e['flora_optax']}, Python "
      f"{e['python']}.\n\n"
      f"Tree: {t['layers']} GPT-2-small blocks (width {t['width']}: `c_attn`, `c_proj`, "
      f"`c_fc`, `mlp.c_proj` kernels, biases, layer norms; {t['params'] / 1e6:.1f}M "
      f"params; embeddings left out for CPU time), rank {r['rank']}, median of {r['reps']} "
      "interleaved rounds; ratio = median of per-round ratios to the first row of "
      "its block. `flora_momentum(rank, 0.9, kappa=1000)`, float32, one jitted `update` "
      "(no resample in the timed steps).\n\n" + md +
      "\nThese are CPU numbers. On a GPU the matmuls are far cheaper relative to random "
      "number generation, so the share of generation (and the gap between projection "
      "kinds and PRNGs) is expected to be larger there; `benchmarks/gpu_step.py` measures "
      "the GPU side.\n")


if __name__ == "__main__":
  main()
