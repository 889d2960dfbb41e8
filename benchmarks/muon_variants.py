"""One-seed probes of flora_muon's options on the quality suite's LM task (issue 20).

    python -m benchmarks.muon_variants            # every variant, seed 0, lr 0.02 (~10 min)
    python -m benchmarks.muon_variants --quick    # two variants, 20 updates (CI smoke test)
    python -m benchmarks.muon_variants --variants kappa=400 --seeds 0 1 2

Each variant is ``flora_muon`` at rank d/4 on ``benchmarks.quality``'s ``shakespeare`` task
(its model, data, schedule and held-out loss), changed in one option from the suite's
``flora_muon`` row (DCT projection, ``emit="residual"``, ``kappa`` 100). Muon itself (at
``beta`` 0.95, 0.9 and 0, the last with no momentum at all) is run beside them. These are
probes for choosing what the suite proper should measure (3 seeds, each row at its best
learning rate): one seed at one learning rate says which options are worth that, not which
is better by less than the seed spread (about ±0.002 here). Results:
``benchmarks/results/muon_variants/``.
"""

from __future__ import annotations

import dataclasses
import json
import time

from benchmarks import _harness
from benchmarks import quality as q

TASK = "shakespeare"
# name -> (flora_muon options over the suite row's, kappa), or (beta, None) for optax.contrib.muon.
VARIANTS = {
    "suite row (kappa 100, residual weight 1)": ({}, 100),
    "residual_weight=0.25": ({"residual_weight": 0.25}, 100),
    "residual_weight=0.5": ({"residual_weight": 0.5}, 100),
    "residual_weight=2": ({"residual_weight": 2.0}, 100),
    "kappa=25": ({}, 25),
    "kappa=400": ({}, 400),
    "kappa=1000 (flora_muon's default)": ({}, 1000),
    "kappa=None (never resampled)": ({}, None),
    "beta=0.9": ({"beta": 0.9}, 100),
    "nesterov=False": ({"nesterov": False}, 100),
    "sketch=two_sided": ({"sketch": "two_sided"}, 100),
    "sketch=factors": ({"sketch": "factors"}, 100),
    # Combinations of the options that helped alone (3 seeds each in docs/howto/muon.md).
    "beta=0.9 kappa=1000": ({"beta": 0.9}, 1000),
    "beta=0.9 kappa=400 residual_weight=2": ({"beta": 0.9, "residual_weight": 2.0}, 400),
    "beta=0.9 kappa=400 residual_weight=3": ({"beta": 0.9, "residual_weight": 3.0}, 400),
    "beta=0.9 kappa=100 residual_weight=2": ({"beta": 0.9, "residual_weight": 2.0}, 100),
    "kappa=1000 residual_weight=2": ({"residual_weight": 2.0}, 1000),
    "kappa=1000 residual_weight=1.5": ({"residual_weight": 1.5}, 1000),
    "beta=0.85 kappa=1000": ({"beta": 0.85}, 1000),
    "beta=0.9 kappa=200 residual_weight=2": ({"beta": 0.9, "residual_weight": 2.0}, 200),
    "kappa=400 residual_weight=2": ({"residual_weight": 2.0}, 400),
    "optax.contrib.muon": (0.95, None),
    "optax.contrib.muon beta=0.9": (0.9, None),
    "optax.contrib.muon beta=0 (no momentum)": (0.0, None),
}
QUICK_VARIANTS = ("suite row (kappa 100, residual weight 1)", "optax.contrib.muon")


def run(task: q.Task, name: str, lr: float, seed: int) -> dict:
  options, kappa = VARIANTS[name]
  if isinstance(options, float):   # Muon itself: the suite's muon row at this beta
    method, task = "muon", dataclasses.replace(task, muon_options={"beta": options})
  else:
    method = f"muon_variants {name}"
    q.METHODS[method] = ("muon", dict(q.METHODS["flora_muon"][1], **options))
    task = dataclasses.replace(task, kappa=kappa)
  try:
    result = q.train(task, method, lr, task.width // 4, seed)
  finally:
    q.METHODS.pop(f"muon_variants {name}", None)
  return {"variant": name, "learning_rate": lr, "seed": seed, "held_out": result["held_out"],
          "last_fifth_gain": result["last_fifth_gain"], "seconds": result["seconds"]}


def main() -> None:
  parser = _harness.arg_parser(__doc__, "two variants, 20 updates, 1 seed")
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--lrs", nargs="*", type=float, default=[0.02])
  parser.add_argument("--muon-lrs", nargs="*", type=float, default=[0.01],
                      help="learning rates of the optax.contrib.muon rows (the suite's best)")
  parser.add_argument("--seeds", nargs="*", type=int, default=[0])
  args = parser.parse_args()
  task = q.TASKS[TASK]
  variants = args.variants
  if args.quick:
    task, variants = q.quick(task), list(QUICK_VARIANTS)
  start = time.perf_counter()
  rows = []
  for name in variants:
    muon = isinstance(VARIANTS[name][0], float)
    for lr in args.muon_lrs if muon else args.lrs:
      for seed in args.seeds:
        rows.append(run(task, name, lr, seed))
        print(json.dumps(rows[-1]), flush=True)
  table = _harness.markdown_table(
      ["variant", "lr", "seed", "held-out loss", "last-fifth gain %", "s / run"],
      [[r["variant"], f"{r['learning_rate']:g}", r["seed"], f"{r['held_out']:.4f}",
        f"{100 * r['last_fifth_gain']:.2f}", f"{r['seconds']:.0f}"] for r in rows])
  out = _harness.results_dir("muon_variants", args.quick, args.out)
  _harness.write_report(out, "muon_variants", {"task": TASK, "rows": rows},
                        f"Task `{TASK}` ({task.title}), {task.steps} updates, rank d/4.\n\n"
                        + table)
  print(table)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
