"""What the 0.2 defaults cost: the ordinary update of each alias, 0.2's defaults against 0.1's.

0.2 changed the defaults (momentum: the DCT projection with ``emit="residual"``; accumulation:
the two-sided sketch) because they trained better (``benchmarks/quality.py``). The rule that
picked them allows an update up to 1.5x the CPU time of the projection's (0.1's default);
this prices both, beside the uncompressed optimizer, on GPT-2 small's tree (fp32):

* XLA's cost model of the ordinary step (``benchmarks/cost_model.py``: the resample and the
  accumulation's finish priced at the branch that runs on an ordinary step), GB and GFLOP;
* CPU wall time of real steps on random arrays (``_harness.time_interleaved``: the
  candidates of one rank interleaved round by round, median and interquartile range), the
  state and the parameters donated; accumulation times micro-steps.

    python -m benchmarks.defaults               # r 64 and 256, 5 rounds (~10 min on 2 cores)
    python -m benchmarks.defaults --quick       # flora_adafactor's rows, r 64, 2 rounds,
                                                # 2 blocks of GPT-2 small

Writes defaults.json and defaults.md into ``benchmarks/results/defaults/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

# As benchmarks/quality.py: OpenBLAS's spinning threads make a small LAPACK solve take tens of
# ms on a loaded 2-core machine. 0.2's default momentum (DCT) has no solve on ordinary steps.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import flora_optax  # noqa: E402
from benchmarks import _harness, cost_model  # noqa: E402

LR, K = 1e-3, 16
# 0.1's defaults, for every transform: the paper's Gaussian projection, emit="compressed".
V0_1 = dict(sketch="projection", projection="gaussian")


@dataclasses.dataclass(frozen=True)
class Row:
  group: str
  name: str
  make: Callable[[int], optax.GradientTransformation]
  role: str            # "naive", "0.1 default" or "0.2 default"


def rows() -> list[Row]:
  fa, fw = flora_optax.flora_adafactor, flora_optax.flora_adamw
  acc = lambda r, **o: flora_optax.flora_accumulate(optax.adafactor(LR), K, r, **o)  # noqa: E731
  return [
      Row("flora_adafactor", "optax.adafactor(momentum=0.9)",
          lambda r: optax.adafactor(LR, momentum=0.9), "naive"),
      Row("flora_adafactor", "flora_adafactor, 0.1 defaults",
          lambda r: fa(LR, r, emit="compressed", **V0_1), "0.1 default"),
      Row("flora_adafactor", "flora_adafactor", lambda r: fa(LR, r), "0.2 default"),
      Row("flora_adamw", "optax.adamw", lambda r: optax.adamw(LR), "naive"),
      Row("flora_adamw", "flora_adamw, 0.1 defaults",
          lambda r: fw(LR, r, emit="compressed", **V0_1), "0.1 default"),
      Row("flora_adamw", "flora_adamw", lambda r: fw(LR, r), "0.2 default"),
      Row("flora_accumulate", f"optax.MultiSteps(adafactor, {K})",
          lambda r: optax.MultiSteps(optax.adafactor(LR), K), "naive"),
      Row("flora_accumulate", f"flora_accumulate(adafactor, {K}), 0.1 defaults",
          lambda r: acc(r, **V0_1), "0.1 default"),
      Row("flora_accumulate", f"flora_accumulate(adafactor, {K})", lambda r: acc(r),
          "0.2 default"),
  ]


def price(row: Row, size: str, rank: int) -> dict:
  config = cost_model.Config(row.name, row.make, row.group, ranked=row.role != "naive")
  measured = cost_model.measure(config, size, jnp.float32, rank, check_pin=False)
  return {"bytes": measured["ordinary"]["bytes"], "flops": measured["ordinary"]["flops"],
          "state_bytes": measured["state_bytes"]}


def time_rows(rows_: list[Row], shapes, rank: int, rounds: int) -> dict:
  params = _harness.random_tree(shapes, 0)
  grads = _harness.random_tree(shapes, 1, scale=1e-3, like_params=False)
  calls = {}
  for row in rows_:
    tx = row.make(rank)
    step = jax.jit(cost_model.step_fn(tx), donate_argnums=(0, 1))
    box = [jax.tree.map(jnp.copy, params)]
    box.append(tx.init(box[0]))

    def call(step=step, box=box):
      box[0], box[1] = step(box[0], box[1], grads)
      return box[0]
    calls[row.name] = call
  return _harness.time_interleaved(calls, rounds, warmup=1)


def main() -> None:
  parser = _harness.arg_parser(
      __doc__, "flora_adafactor's rows, r 64, 2 rounds, 2 blocks of GPT-2 small")
  parser.add_argument("--ranks", nargs="*", type=int, default=[64, 256])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  logging.getLogger("jax").setLevel(logging.ERROR)
  start = time.perf_counter()
  size = "small"
  if args.quick:
    args.ranks, args.rounds = [64], 2
    size = "small-2"
  shapes = _harness.gpt2_shapes(_harness.GPT2[size])
  # The smoke test prices one group: the others run the same code on other optimizers.
  chosen = [r for r in rows() if not args.quick or r.group == "flora_adafactor"]
  results = []
  for rank in args.ranks:
    timings = time_rows(chosen, shapes, rank, args.rounds)
    for row in chosen:
      priced = price(row, size, rank)
      base = next(x for x in chosen if x.group == row.group and x.role == "0.1 default")
      t = timings[row.name].summary(timings[base.name])   # per-round ratios to 0.1's
      naive = next(x for x in results if x["group"] == row.group and x["rank"] == rank
                   and x["role"] == "naive") if row.role != "naive" else None
      results.append({"group": row.group, "optimizer": row.name, "role": row.role,
                      "rank": rank, **priced, **t,
                      "bytes_to_naive": priced["bytes"] / (naive or priced)["bytes"]})
      print(f"r={rank} {row.name}: {priced['bytes'] / 1e9:.2f} GB, {t['ms']:.0f} ms "
            f"({t['ratio']:.2f}x 0.1's)", flush=True)
  table = _harness.markdown_table(
      ["transform", "optimizer", "rank", "ordinary-step GB (XLA)", "/ naive", "GFLOP",
       "state MB", "CPU ms per step (median)", "time / 0.1 default (median [p25, p75])"],
      [[r["group"], r["optimizer"], r["rank"], f"{r['bytes'] / 1e9:.2f}",
        f"{r['bytes_to_naive']:.2f}", f"{r['flops'] / 1e9:.1f}", f"{r['state_bytes'] / 1e6:.1f}",
        f"{r['ms']:.0f}", f"{r['ratio']:.2f} [{r['ratio_p25']:.2f}, {r['ratio_p75']:.2f}]"]
       for r in results])
  out = _harness.results_dir("defaults", args.quick, args.out)
  tree = "small" if not args.quick else "small, 2 blocks, 4096 tokens"
  tables = (f"GPT-2 {tree}, fp32. Ordinary step: "
            f"update + apply_updates with the resample (momentum) or the finish of a cycle "
            f"(accumulation, k = {K}) priced at the branch that does not run. Time: "
            f"{args.rounds} interleaved rounds per rank.\n\n" + table)
  _harness.write_report(out, "defaults", {"rows": results, "seconds":
                                          time.perf_counter() - start}, tables)
  print(tables)


if __name__ == "__main__":
  main()
