"""Optimizer-update and train-step timings of Flora vs optax baselines, for one GPU run.

What it measures (one process, one device):

* **update step**: ``tx.update`` + ``optax.apply_updates``, jitted, params and state donated,
  on GPT-2-small- and GPT-2-medium-shaped parameter trees (real random arrays on the device;
  gradients are a fixed random tree of the params' dtype), fp32 and bf16 params, for
  ``optax.adafactor`` (no momentum), ``optax.adafactor(momentum=0.9)`` (*naive*, the
  reference of every ratio), ``flora_optax.flora_adafactor(lr, r, momentum=0.9)``,
  ``optax.MultiSteps(optax.adafactor(lr), 16)`` vs ``flora_optax.flora_accumulate(
  optax.adafactor(lr), 16, r)`` (per micro-step: one repetition is one whole cycle of 16
  micro-steps, divided by 16, so the emitting step is included) and
  ``optax.contrib.galore(lr, rank=r)``;
* **train step**: forward + backward + update of a GPT-2-small-size LM in plain JAX (tied
  embeddings, causal attention via ``jax.nn.dot_product_attention``), fp32, batch 8 x 512,
  for adafactor without momentum, naive momentum, Flora momentum (each rank) and GaLore
  (largest rank).

Timing method: every configuration of a group (one tree size and dtype) is compiled first
(in parallel threads, with a persistent compilation cache), warmed up, then timed by
``_harness.time_interleaved``: interleaved rounds (each round runs every configuration once,
in an order rotated by one per round, ended by ``jax.block_until_ready``). Reported: the median
time, its interquartile range, and the ratio to naive momentum as the median of the per-round
ratios (measured side by side). Flora's default ``kappa=1000`` means no timed step resamples (the
resample branch sits behind a ``lax.cond``); GaLore's SVD (every 200 steps) likewise is
not in the median.

Peak device memory: every configuration is rerun in a **fresh subprocess** (it builds the
params, the gradients (update step only) and the state, runs the step, and reads
``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``), so each peak is clean. Workers
run a few at a time with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and reuse the compilation
cache. Also recorded: ``bytes_in_use`` before the first step (params + grads + state) and
XLA's ``memory_analysis()`` of the compiled step (temp bytes), from the timing process.

Floor (update step only): ``bytes / bandwidth`` with bytes = params read + written, grads
read, optimizer state read + written (for accumulation: params r/w and the accumulator r/w
every micro-step, the inner state r/w once per cycle), bandwidth measured by a large device
copy (``x + 1`` on a 1 GiB array: read + write); and ``flops / rate`` with
2·n·m·r flops per projection matmul (Flora momentum and GaLore: down + up every step; Flora
accumulation: down every micro-step, up once per cycle), rate measured on a
``(4D, D) @ (D, r)`` fp32 matmul at default precision. ``floor = max(bytes, flops)`` terms.

Device command (one call from the repository root, under 10 minutes on an H100; the script
stops starting new work at ``--budget-s`` seconds and always writes what it has)::

    pip install --no-deps -e . >/dev/null && python -m benchmarks.gpu_step --out $OUT

Default repetition counts are small (``--reps 20`` update, ``--train-reps 15``) to leave
room for ~45 compilations; raise them with ``--reps`` when time allows.
CPU smoke test (CI): ``python -m benchmarks.gpu_step --quick`` (tiny trees, < 60 s).

Output: a markdown table on stdout, ``gpu_step.json`` and ``gpu_step.md`` in ``--out``
(default ``$OUT`` if set, else ``benchmarks/results/gpu_step/``; ``--quick``:
``benchmarks/results/gpu_step-quick/``).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

# Must be set before JAX initialises its backend: the main process shares the GPU with the
# memory workers, so it must not grab 75 % of the device up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import flora_optax  # noqa: E402
from benchmarks import _harness  # noqa: E402

SIZES = {
    "small": _harness.GPT2["small"],
    "medium": _harness.GPT2["medium"],
    "tiny": _harness.GPT2Size(layers=2, width=64, heads=4, vocab=512, context=128),
}
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
LR = 1e-3
K_ACC = 16

# H100 reference (docs/spec.md, "Reference costs"), GPT-2-small tree, fp32, ms.
REFERENCE_MS = {
    ("update", "small", "fp32", "adafactor"): 11.0,
    ("update", "small", "fp32", "naive"): 10.3,
    ("update", "small", "fp32", "galore_r256"): 9.3,
    ("update", "small", "fp32", "multisteps16"): 9.7,
    ("train", "small", "fp32", "adafactor"): 43.0,
    ("train", "small", "fp32", "naive"): 44.5,
    ("train", "small", "fp32", "galore_r256"): 41.3,
}

T0 = time.perf_counter()


def log(msg):
  print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------- trees and model


def layer_norm(x, p, eps=1e-5):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def gpt2_loss(params, tokens, heads):
  b, t = tokens.shape
  d = params["wte"].shape[1]
  x = params["wte"][tokens] + params["wpe"][:t]
  for name in sorted(k for k in params if k.startswith("h_")):
    p = params[name]
    h = layer_norm(x, p["ln_1"])
    qkv = h @ p["attn"]["c_attn"]["kernel"] + p["attn"]["c_attn"]["bias"]
    q, k, v = (z.reshape(b, t, heads, d // heads) for z in jnp.split(qkv, 3, axis=-1))
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
    x = x + a @ p["attn"]["c_proj"]["kernel"] + p["attn"]["c_proj"]["bias"]
    h = layer_norm(x, p["ln_2"])
    h = jax.nn.gelu(h @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"])
    x = x + h @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]
  x = layer_norm(x, params["ln_f"])
  logits = x[:, :-1] @ params["wte"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# ------------------------------------------------------------------------- optimizers


def make_optimizer(opt, rank):
  """(GradientTransformation, micro-steps per timed repetition)."""
  if opt == "adafactor":
    return optax.adafactor(LR), 1
  if opt == "naive":
    return optax.adafactor(LR, momentum=0.9), 1
  if opt == "flora":
    return flora_optax.flora_adafactor(LR, rank, momentum=0.9), 1
  if opt == "flora_two_sided":
    return flora_optax.flora_adafactor(LR, rank, momentum=0.9, sketch="two_sided"), 1
  if opt == "multisteps":
    return optax.MultiSteps(optax.adafactor(LR), K_ACC).gradient_transformation(), K_ACC
  if opt == "flora_acc":
    return flora_optax.flora_accumulate(optax.adafactor(LR), K_ACC, rank), K_ACC
  if opt == "flora_acc_two_sided":
    return flora_optax.flora_accumulate(optax.adafactor(LR), K_ACC, rank,
                                        sketch="two_sided"), K_ACC
  if opt == "galore":
    return optax.contrib.galore(LR, rank=rank), 1
  raise ValueError(opt)


def config_name(opt, rank):
  return {"adafactor": "adafactor", "naive": "naive", "multisteps": f"multisteps{K_ACC}",
          "flora": f"flora_r{rank}", "flora_acc": f"flora_acc{K_ACC}_r{rank}",
          "flora_two_sided": f"flora_two_sided_r{rank}",
          "flora_acc_two_sided": f"flora_acc{K_ACC}_two_sided_r{rank}",
          "galore": f"galore_r{rank}"}[opt]


def update_configs(ranks, two_sided=True):
  cfgs = [("naive", None), ("adafactor", None)]
  cfgs += [("flora", r) for r in ranks]
  cfgs += [("flora_two_sided", r) for r in ranks if two_sided]
  cfgs += [("galore", r) for r in ranks]
  cfgs += [("multisteps", None)]
  cfgs += [("flora_acc", r) for r in ranks]
  cfgs += [("flora_acc_two_sided", r) for r in ranks if two_sided]
  return cfgs


def train_configs(ranks):
  return ([("naive", None), ("adafactor", None)] + [("flora", r) for r in ranks]
          + [("flora_two_sided", max(ranks)), ("galore", max(ranks))])


def tree_bytes(tree):
  return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


class Config:
  """One thing to time: its jitted step, compiled, and the device buffers it owns."""

  def __init__(self, kind, size, dtype, opt, rank, quick):
    self.kind, self.size, self.dtype, self.opt, self.rank = kind, size, dtype, opt, rank
    self.name = config_name(opt, rank)
    self.tx, self.calls = make_optimizer(opt, rank)
    if kind == "train":
      self.calls = 1
    self.quick = quick
    self.error = None
    self.compiled = None

  def build(self):
    dt = DTYPES[self.dtype]
    shapes = _harness.gpt2_shapes(SIZES[self.size], dt)
    self.params = _harness.random_tree(shapes, seed=0)
    if self.kind == "update":
      self.extra = _harness.random_tree(shapes, seed=1, scale=1e-3, like_params=False)  # grads
    else:
      b, t = (2, 32) if self.quick else (8, 512)
      self.extra = jax.random.randint(jax.random.key(2), (b, t), 0, SIZES[self.size].vocab,
                                      jnp.int32)
    self.state = jax.jit(self.tx.init)(self.params)
    jax.block_until_ready((self.params, self.state, self.extra))
    self.params_bytes = tree_bytes(self.params)
    self.state_bytes = tree_bytes(self.state)

  def lower(self):
    tx = self.tx
    if self.kind == "update":
      def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    else:
      heads = SIZES[self.size].heads

      def step(params, state, tokens):
        loss, grads = jax.value_and_grad(gpt2_loss)(params, tokens, heads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    self.lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
        self.params, self.state, self.extra)

  def compile(self):
    t = time.perf_counter()
    self.compiled = self.lowered.compile()
    self.compile_s = time.perf_counter() - t
    del self.lowered
    try:
      ma = self.compiled.memory_analysis()
      self.memory_analysis = {k: int(getattr(ma, k)) for k in (
          "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001  (not every backend implements it)
      self.memory_analysis = None

  def run(self, n):
    out = None
    for _ in range(n):
      out = self.compiled(self.params, self.state, self.extra)
      self.params, self.state = out[0], out[1]
    return out

  def free(self):
    for attr in ("params", "state", "extra", "compiled"):
      if hasattr(self, attr):
        delattr(self, attr)


# ------------------------------------------------------------------------- floor


def median_seconds(fn, reps=10):
  return _harness.time_interleaved({"fn": fn}, reps)["fn"].median


def measure_bandwidth(quick, reps=10):
  n = (4 << 20) if quick else (256 << 20)  # float32 elements: 16 MiB or 1 GiB
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x + 1.0)
  return 2 * n * 4 / median_seconds(lambda: f(x), reps)  # bytes/s, read + write


def measure_matmul(n, d, r, reps=10, dtype=jnp.float32):
  a = jax.random.normal(jax.random.key(0), (n, d), dtype)
  b = jax.random.normal(jax.random.key(1), (d, r), dtype)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n * d * r / median_seconds(lambda: f(a, b), reps)  # flop/s


def projection_flops(cfg):
  """Matmul flops per (micro-)step: 2·n·m·r per projection matmul."""
  if cfg.opt in ("flora_two_sided", "flora_acc_two_sided"):
    return None  # several matmuls and a QR per leaf: no single projection floor
  if cfg.opt in ("flora", "flora_acc"):
    mats = jax.eval_shape(lambda p: flora_optax.projections(
        p, cfg.rank, 0, transform="momentum" if cfg.opt == "flora" else "accumulate"),
        cfg.params)
    total = 0
    for leaf, a in zip(jax.tree.leaves(cfg.params), jax.tree.leaves(mats, is_leaf=lambda x: x is None)):
      if a is None:
        continue
      one = 2 * leaf.size * cfg.rank
      total += 2 * one if cfg.opt == "flora" else one + one / K_ACC
    return total
  if cfg.opt == "galore":
    total = 0
    projector = cfg.state[0].projector
    for leaf, proj in zip(jax.tree.leaves(cfg.params), jax.tree.leaves(projector)):
      if proj.size:
        total += 2 * 2 * leaf.size * cfg.rank
    return total
  return 0


def floor_bytes(cfg):
  p = cfg.params_bytes
  g = p  # gradients have the params' dtype
  if cfg.opt in ("multisteps", "flora_acc"):
    acc = tree_bytes(cfg.state.acc_grads if cfg.opt == "multisteps" else cfg.state.compressed_acc)
    inner = tree_bytes(cfg.state.inner_opt_state)
    return 2 * p + g + 2 * acc + 2 * inner / K_ACC
  return 2 * p + g + 2 * cfg.state_bytes


# ------------------------------------------------------------------------- phases


def time_group(kind, size, dtype, cfg_list, args, deadline, results):
  reps = args.train_reps if kind == "train" else args.reps
  cfgs = [Config(kind, size, dtype, opt, rank, args.quick) for opt, rank in cfg_list]
  log(f"{kind} {size} {dtype}: building {len(cfgs)} configurations")
  live = []
  for c in cfgs:
    try:
      c.build()
      c.lower()
      live.append(c)
    except Exception as e:  # noqa: BLE001
      c.error = f"{type(e).__name__}: {e}"
      log(f"  {c.name}: build/lower failed: {c.error[:300]}")
  t = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
    futures = {pool.submit(c.compile): c for c in live}
    for fut in concurrent.futures.as_completed(futures):
      c = futures[fut]
      try:
        fut.result()
      except Exception as e:  # noqa: BLE001
        c.error = f"{type(e).__name__}: {e}"
        log(f"  {c.name}: compile failed: {c.error[:300]}")
  live = [c for c in live if c.error is None]
  log(f"  compiled in {time.perf_counter() - t:.1f}s wall; per thread, overlapping: "
      f"({', '.join(f'{c.name} {c.compile_s:.1f}' for c in live)})")
  for c in list(live):
    try:
      jax.block_until_ready(c.run(c.calls * args.warmup))
    except Exception as e:  # noqa: BLE001
      c.error = f"{type(e).__name__}: {e}"
      log(f"  {c.name}: warm-up failed: {c.error[:300]}")
      live.remove(c)
  timings = _harness.time_interleaved(
      {c.name: (lambda c=c: c.run(c.calls)) for c in live}, reps, warmup=0,
      units={c.name: c.calls for c in live}, deadline=deadline)
  done = min((len(t.seconds) for t in timings.values()), default=0)
  if done < reps:
    log(f"  budget reached: stopped after {done} repetitions")
  naive = timings.get(next((c.name for c in live if c.opt == "naive"), None))
  for c in cfgs:
    row = dict(kind=kind, size=size, dtype=dtype, name=c.name, opt=c.opt, rank=c.rank,
               micro_steps_per_rep=c.calls, error=c.error)
    timing = timings.get(c.name)
    if c.error is None and timing is not None and timing.seconds:
      summary = timing.summary(naive)
      if "ratio" in summary:
        summary["ratio_to_naive"] = summary.pop("ratio")
      row.update(
          reps=summary.pop("rounds"), **summary,
          compile_s=c.compile_s, params_bytes=c.params_bytes, state_bytes=c.state_bytes,
          state_over_params=c.state_bytes / c.params_bytes,
          memory_analysis=c.memory_analysis)
      if kind == "update":
        fb = floor_bytes(c)
        ff = projection_flops(c)
        row.update(floor_bytes=fb, floor_flops=ff)
      ref = REFERENCE_MS.get((kind, size, dtype, c.name))
      if ref is not None and not args.quick:
        row["reference_h100_ms"] = ref
    results["timings"].append(row)
  for c in cfgs:
    c.free()
  log(f"  {kind} {size} {dtype}: " + ", ".join(
      f"{r['name']} {r.get('ms', float('nan')):.2f}ms" for r in results["timings"]
      if r["kind"] == kind and r["size"] == size and r["dtype"] == dtype))


def add_floors(results):
  bw = results["floor"]["bandwidth_bytes_per_s"]
  rates = results["floor"]["matmul_flops_per_s"]
  for row in results["timings"]:
    if "floor_bytes" not in row:
      continue
    row["floor_bytes_ms"] = 1e3 * row["floor_bytes"] / bw
    rate = rates.get(f"{row['size']}_r{row['rank']}") if row["rank"] else None
    flops = row["floor_flops"] or 0  # None: no single projection floor (two-sided sketch)
    row["floor_flops_ms"] = 1e3 * flops / rate if rate else 0.0
    row["floor_ms"] = max(row["floor_bytes_ms"], row["floor_flops_ms"])


def memory_worker(spec):
  """Runs in a fresh process: one configuration, prints its clean peak memory."""
  c = Config(spec["kind"], spec["size"], spec["dtype"], spec["opt"], spec["rank"],
             spec["quick"])
  dev = jax.devices()[0]
  c.build()
  stats0 = dev.memory_stats() or {}
  c.lower()
  c.compile()
  stats1 = dev.memory_stats() or {}
  jax.block_until_ready(c.run(c.calls * 2))
  stats2 = dev.memory_stats() or {}
  out = dict(spec, in_use_before_step=stats0.get("bytes_in_use"),
             peak_before_step=stats1.get("peak_bytes_in_use"),
             peak_bytes=stats2.get("peak_bytes_in_use"),
             params_bytes=c.params_bytes, state_bytes=c.state_bytes,
             memory_analysis=c.memory_analysis)
  print("RESULT " + json.dumps(out), flush=True)


def memory_phase(specs, args, deadline, results):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  procs = {}
  pending = list(specs)
  mem = results["memory"]
  while pending or procs:
    while pending and len(procs) < args.memory_workers:
      spec = pending.pop(0)
      left = deadline - time.perf_counter()
      if left < 20:
        mem.append(dict(spec, error="skipped: time budget"))
        continue
      cmd = [sys.executable, "-m", "benchmarks.gpu_step", "--_worker", json.dumps(spec),
             "--cache-dir", args.cache_dir]
      p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, cwd=_harness.REPO_ROOT)
      procs[p] = (spec, time.perf_counter() + left)
    for p, (spec, until) in list(procs.items()):
      if p.poll() is None and time.perf_counter() < until:
        continue
      if p.poll() is None:
        p.kill()
      out = p.communicate()[0]
      line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
      if line:
        mem.append(json.loads(line[len("RESULT "):]))
      else:
        mem.append(dict(spec, error=f"rc={p.returncode}: {out[-600:]}"))
      del procs[p]
      r = mem[-1]
      log(f"  memory {spec['kind']} {spec['size']} {spec['dtype']} "
          f"{config_name(spec['opt'], spec['rank'])}: "
          + (f"peak {r['peak_bytes'] / 1e9:.3f} GB" if r.get("peak_bytes") else
             f"{r.get('error', 'no memory_stats on this backend')[:200]}"))
    time.sleep(0.05)


# ------------------------------------------------------------------------- report


def _fmt(x, f="{:.2f}"):
  return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f.format(x)


def markdown(results):
  mem = {(m["kind"], m["size"], m["dtype"], config_name(m["opt"], m["rank"])): m
         for m in results["memory"]}
  lines = [f"Measured bandwidth {results['floor']['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s "
           f"(1 GiB `x + 1`, read + write); matmul rate (fp32, default precision): "
           + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s"
                       for k, v in results["floor"]["matmul_flops_per_s"].items()) + ".",
           ""]
  for kind in ("update", "train"):
    rows = [r for r in results["timings"] if r["kind"] == kind]
    if not rows:
      continue
    if kind == "update":
      lines += ["### Optimizer update (`update` + `apply_updates`, jitted, donated; "
                f"accumulation per micro-step over a cycle of {K_ACC})", "",
                "| tree | dtype | optimizer | ms (p25-p75) | ratio to naive (p25-p75) | "
                "floor ms (bytes / flops) | state / params | peak GB | H100 ref ms |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    else:
      lines += ["", "### Train step (GPT-2-small-size LM, fp32, forward + backward + update)",
                "", "| model | dtype | optimizer | ms (p25-p75) | ratio to naive (p25-p75) | "
                "state / params | peak GB | H100 ref ms |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
      m = mem.get((kind, r["size"], r["dtype"], r["name"]), {})
      peak = _fmt(m["peak_bytes"] / 1e9, "{:.3f}") if m.get("peak_bytes") else ""
      if r.get("error"):
        lines.append(f"| {r['size']} | {r['dtype']} | {r['name']} | error: "
                     f"{r['error'][:80]} | | | | | |")
        continue
      ms = f"{r['ms']:.3f} ({r['ms_p25']:.3f}-{r['ms_p75']:.3f})"
      ratio = (f"{r['ratio_to_naive']:.2f} ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f})"
               if "ratio_to_naive" in r else "")
      ref = _fmt(r.get("reference_h100_ms"), "{:.1f}")
      if kind == "update":
        fl = (f"{r['floor_ms']:.3f} ({r['floor_bytes_ms']:.3f} / {r['floor_flops_ms']:.3f})"
              if "floor_ms" in r else "")
        lines.append(f"| {r['size']} | {r['dtype']} | {r['name']} | {ms} | {ratio} | {fl} | "
                     f"{r['state_over_params']:.3f} | {peak} | {ref} |")
      else:
        lines.append(f"| {r['size']} | {r['dtype']} | {r['name']} | {ms} | {ratio} | "
                     f"{r['state_over_params']:.3f} | {peak} | {ref} |")
  lines += ["", "Peak GB: `peak_bytes_in_use` of a fresh process that built the params, "
            "gradients (update) / token batch (train) and state and ran the step; empty "
            "where the backend has no `memory_stats()` (CPU) or the budget ran out.", ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------- main


def main():
  ap = _harness.arg_parser(__doc__, "tiny trees, 3 reps (CPU smoke test)")
  ap.add_argument("--sizes", default=None, help="comma list of small,medium,tiny")
  ap.add_argument("--ranks", default=None, help="comma list, default 64,256")
  ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16")
  ap.add_argument("--reps", type=int, default=None, help="update-step repetitions (20)")
  ap.add_argument("--train-reps", type=int, default=None, help="train-step repetitions (15)")
  ap.add_argument("--warmup", type=int, default=2, help="warm-up repetitions")
  ap.add_argument("--no-train", action="store_true")
  ap.add_argument("--no-memory", action="store_true")
  ap.add_argument("--train-size", default=None, help="model size of the train step (small)")
  ap.add_argument("--memory-workers", type=int, default=None)
  ap.add_argument("--compile-threads", type=int, default=8)
  ap.add_argument("--budget-s", type=float, default=None,
                  help="stop starting new work after this many seconds (530; quick 240: the smoke test must reach every phase)")
  ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                      "flora_gpu_step_cache"))
  ap.add_argument("--_worker", default=None, help="(internal: one memory measurement)")
  args = ap.parse_args()
  if args.quick or (args._worker and json.loads(args._worker).get("quick")):
    # Smoke test: compile time dominates on CPU; the unoptimised backend compiles ~3x faster.
    # (XLA_FLAGS is read when the backend starts, which has not happened yet.)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0")

  jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args._worker:
    memory_worker(json.loads(args._worker))
    return

  q = args.quick
  sizes = (args.sizes or ("tiny" if q else "small,medium")).split(",")
  ranks = [int(r) for r in (args.ranks or ("8" if q else "64,256")).split(",")]
  dtypes = (args.dtypes or "fp32,bf16").split(",")
  args.reps = args.reps or (3 if q else 20)
  args.train_reps = args.train_reps or (3 if q else 15)
  args.budget_s = args.budget_s or (240 if q else 530)
  args.memory_workers = args.memory_workers or (1 if q else 3)
  train_size = args.train_size or ("tiny" if q else "small")
  # --quick never writes into the committed results unless told to with --out.
  out_dir = _harness.results_dir("gpu_step", q, args.out or os.environ.get("OUT"))
  # Timing stops starting new groups early enough to leave the memory phase its share.
  reserve = 0 if args.no_memory else (10 if q else 100)
  deadline = T0 + args.budget_s - reserve

  info = _harness.machine_info()
  results = dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                 method=__doc__, timings=[], memory=[], floor={})
  log(f"device {info['device']}, jax {jax.__version__}; out {out_dir}")

  def save():
    md = markdown(results)
    _harness.write_report(out_dir, "gpu_step", results, md, info)
    return md

  # Floor: bandwidth and matmul rates (a few seconds).
  results["floor"]["bandwidth_bytes_per_s"] = measure_bandwidth(q)
  rates = {}
  for size in sorted(set(sizes)):
    d = SIZES[size].width
    for r in ranks:
      rates[f"{size}_r{r}"] = measure_matmul(4 * d, d, r)
  rates["square"] = measure_matmul(*(3 * (512 if q else 8192,)))
  results["floor"]["matmul_flops_per_s"] = rates
  log(f"bandwidth {results['floor']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; matmul "
      + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()))

  # Timing groups, most important first; the train step right after the first group.
  # --quick (CI) leaves out the two-sided sketch: its QR-heavy step takes a minute to compile
  # on 2 CPU cores and the smoke test is about the script, not the numbers.
  groups = [("update", s, d, update_configs(ranks, two_sided=not q)) for d in dtypes
            for s in sizes]
  if not args.no_train:
    groups.insert(1, ("train", train_size, "fp32", train_configs(ranks)))
  if q:  # smoke test: every code path once, few compilations
    groups = [(k, s, d, cfgs if i == 0 else [c for c in cfgs if c[0] in ("naive", "flora")])
              for i, (k, s, d, cfgs) in enumerate(groups)]
  for kind, size, dtype, cfgs in groups:
    if time.perf_counter() > deadline - (15 if q else 45):
      log(f"skipping {kind} {size} {dtype}: time budget")
      results["timings"].append(dict(kind=kind, size=size, dtype=dtype, name="*",
                                     error="skipped: time budget"))
      continue
    try:
      time_group(kind, size, dtype, cfgs, args, deadline, results)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      results["timings"].append(dict(kind=kind, size=size, dtype=dtype, name="*",
                                     error=f"{type(e).__name__}: {e}"))
    add_floors(results)
    save()

  # Peak memory, each configuration in a fresh process (cheap: compilation cache is warm).
  if not args.no_memory:
    specs = []
    for kind, size, dtype, cfgs in groups:
      if q:  # the smoke test exercises the worker path on one configuration only
        cfgs = [c for c in cfgs if c[0] in ("naive", "flora")][:2]
      specs += [dict(kind=kind, size=size, dtype=dtype, opt=o, rank=r, quick=q)
                for o, r in cfgs]
    train_specs = [s for s in specs if s["kind"] == "train"]
    specs = train_specs + [s for s in specs if s["kind"] != "train"]
    if q:
      specs = specs[:1]
    log(f"memory phase: {len(specs)} fresh processes, {args.memory_workers} at a time")
    memory_phase(specs, args, T0 + args.budget_s, results)
  md = save()
  print()
  print(md)
  log(f"done; wrote {out_dir / 'gpu_step.json'} and gpu_step.md")


if __name__ == "__main__":
  main()
