"""Validation loss of Flora against naive Adafactor momentum/accumulation and GaLore, over seeds.

On the Shakespeare character model of ``examples/shakespeare_demo.py`` (same model, data,
learning rate and number of updates), trained from scratch:

* momentum: none, naive (``optax.adafactor(momentum=0.9)``), Flora at rank d/8, d/4, d/2 with
  kappa 20 and 100, and GaLore (Adam in the subspace) at the rank whose state is closest to
  Flora's at d/4;
* accumulation (k = 16, micro-batches of one sequence): naive ``optax.MultiSteps`` vs Flora at
  the same ranks (and an orthogonal projection at d/4);
* options that pick the library defaults, at rank d/4 and kappa 20, each changed alone from the
  paper's choices (gaussian projection, unbiased transfer, compressed emit, momentum after the
  factored RMS), which every other Flora run pins explicitly: projection, transfer, emit and
  ``flora_adafactor``'s momentum position.

Every run is stored as it finishes (``runs/<config>-seed<n>.json``) and skipped when found, so an
interrupted sweep resumes where it stopped; the tables and plots are rebuilt from all stored runs.

    python benchmarks/quality.py                 # 3 seeds x 20 configurations, 300 updates each
    python benchmarks/quality.py --quick         # 1 seed, 3 configurations, 30 steps (smoke test)

Writes ``benchmarks/results/quality/`` (``quality-quick/`` with --quick): quality.json,
quality.md, momentum.png, accumulation.png, options.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import _common  # noqa: F401  (puts examples/ on sys.path)
import jax
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import flora_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import shakespeare_demo as demo  # noqa: E402
import shakespeare_lm as lm  # noqa: E402

KAPPAS = (20, 100)
# The option comparisons (and GaLore's projection gap) use the more often resampled kappa,
# where the projection noise that the options address matters most.
OPTIONS_KAPPA = 20
GALORE_LEARNING_RATE = 1e-2  # best of 3e-3, 1e-2, 3e-2 in a 200-step probe on this model
FACTOR = dict(min_dim_size_to_factor=lm.MIN_DIM_TO_FACTOR)
# Every Flora option is spelled out (the paper's choices) so that a change of the library's
# defaults never changes what a stored run means; the option rows override one at a time.
PINNED_MOMENTUM = dict(projection="gaussian", transfer="unbiased", emit="compressed",
                       momentum_position="after_factored_rms")
PINNED_ACCUMULATION = dict(projection="gaussian")


def flora_momentum_spec(name, group, lr, rank, kappa, **changed) -> lm.OptimizerSpec:
  options = {**PINNED_MOMENTUM, **changed}
  return lm.OptimizerSpec(
      name, lambda seed: flora_optax.flora_adafactor(
          lr, rank, momentum=demo.MOMENTUM, kappa=kappa, seed=seed, **FACTOR, **options),
      details={"group": group, "rank": rank, "kappa": kappa, **options})


def flora_accumulation_spec(name, lr, rank, **changed) -> lm.OptimizerSpec:
  options = {**PINNED_ACCUMULATION, **changed}
  return lm.OptimizerSpec(
      name, lambda seed: flora_optax.flora_accumulate(
          optax.adafactor(lr, **FACTOR), demo.ACCUMULATE_EVERY, rank, seed=seed, **options),
      accumulate_every=demo.ACCUMULATE_EVERY,
      details={"group": "accumulation", "rank": rank, **options})


def galore_rank_matching(target_bytes: int, params: Any, max_rank: int) -> int:
  """The GaLore rank whose exact state size is closest to ``target_bytes``."""
  def size(rank):
    tx = optax.contrib.galore(GALORE_LEARNING_RATE, rank=rank)
    return flora_optax.state_bytes(jax.eval_shape(tx.init, params))
  return min(range(1, max_rank + 1), key=lambda r: abs(size(r) - target_bytes))


def all_specs(config: lm.Config, params: Any) -> list[lm.OptimizerSpec]:
  lr, d = config.learning_rate, config.d_model
  ranks = (d // 8, d // 4, d // 2)
  default_rank, default_kappa = d // 4, OPTIONS_KAPPA
  flora_default_bytes = flora_optax.state_bytes(jax.eval_shape(flora_optax.flora_adafactor(
      lr, default_rank, momentum=demo.MOMENTUM, kappa=default_kappa, **FACTOR,
      **PINNED_MOMENTUM).init, params))
  galore_rank = galore_rank_matching(flora_default_bytes, params, d // 2)

  specs = [
      lm.OptimizerSpec("no momentum", lambda seed: optax.adafactor(lr, **FACTOR),
                       details={"group": "momentum"}),
      lm.OptimizerSpec("naive momentum", lambda seed: optax.adafactor(
          lr, momentum=demo.MOMENTUM, **FACTOR), details={"group": "momentum"}),
  ]
  specs += [flora_momentum_spec(f"flora r={r} kappa={k}", "momentum", lr, r, k)
            for r in ranks for k in KAPPAS]
  # The best transfer of the option rows at the better kappa: do the two gains add up?
  specs.append(flora_momentum_spec(f"flora r={default_rank} kappa={KAPPAS[-1]} "
                                   "transfer=least_squares", "momentum", lr, default_rank,
                                   KAPPAS[-1], transfer="least_squares"))
  specs.append(lm.OptimizerSpec(
      f"galore r={galore_rank}", lambda seed: optax.contrib.galore(
          GALORE_LEARNING_RATE, rank=galore_rank, update_proj_gap=default_kappa),
      details={"group": "momentum", "rank": galore_rank, "update_proj_gap": default_kappa,
               "learning_rate": GALORE_LEARNING_RATE}))
  specs.append(lm.OptimizerSpec(
      "naive accumulation", lambda seed: optax.MultiSteps(optax.adafactor(lr, **FACTOR),
                                                          demo.ACCUMULATE_EVERY),
      accumulate_every=demo.ACCUMULATE_EVERY, details={"group": "accumulation"}))
  specs += [flora_accumulation_spec(f"flora accumulation r={r}", lr, r) for r in ranks]
  specs.append(flora_accumulation_spec(f"flora accumulation r={default_rank} orthogonal", lr,
                                       default_rank, projection="orthogonal"))
  # One option changed at a time from the library defaults (the r=d/4, kappa=20 run above).
  for option, value in (("projection", "orthogonal"), ("projection", "rademacher"),
                        ("transfer", "least_squares"), ("emit", "exact_gradient"),
                        ("momentum_position", "after_param_scale")):
    specs.append(flora_momentum_spec(f"flora r={default_rank} kappa={default_kappa} "
                                     f"{option}={value}", "options", lr, default_rank,
                                     default_kappa, **{option: value}))
  return specs


def quick_specs(specs: list[lm.OptimizerSpec]) -> list[lm.OptimizerSpec]:
  keep = {"naive momentum", "flora r=16 kappa=20", "flora accumulation r=16"}
  return [s for s in specs if s.name in keep]


def run_file_name(name: str, seed: int) -> str:
  safe = "".join(c if c.isalnum() else "_" for c in name)
  return f"{safe}-seed{seed}.json"


def summarize(runs: list[dict]) -> list[dict]:
  """Mean and spread of the final losses of each configuration, in the order first seen."""
  names = list(dict.fromkeys(r["optimizer"] for r in runs))
  rows = []
  for name in names:
    mine = [r for r in runs if r["optimizer"] == name]
    val = np.array([r["validation_loss"] for r in mine])
    train = np.array([r["final_train_loss"] for r in mine])
    rows.append({
        "optimizer": name, "details": mine[0]["details"], "seeds": [r["seed"] for r in mine],
        "validation_mean": float(np.mean(val)),
        "validation_std": float(np.std(val, ddof=1)) if len(val) > 1 else 0.0,
        "validation_min": float(np.min(val)), "validation_max": float(np.max(val)),
        "train_mean": float(np.mean(train)), "diverged": int(sum(r["diverged"] for r in mine)),
        "opt_state_bytes": mine[0]["opt_state_bytes"],
        "median_update_ms": float(np.median([r["median_update_ms"] for r in mine])),
    })
  return rows


def markdown(rows: list[dict]) -> str:
  by_name = {r["optimizer"]: r for r in rows}
  sections = []
  for group, baseline in (("momentum", "naive momentum"), ("accumulation", "naive accumulation"),
                          ("options", "flora r=16 kappa=20")):
    base = by_name.get(baseline)
    table = []
    members = [r for r in rows if r["details"].get("group") == group]
    if group == "options" and base is not None:
      members = [base] + members
    for r in members:
      delta = (f"{100 * (r['validation_mean'] / base['validation_mean'] - 1):+.2f}%"
               if base else "-")
      table.append([r["optimizer"], f"{r['validation_mean']:.4f} ± {r['validation_std']:.4f}",
                    f"[{r['validation_min']:.4f}, {r['validation_max']:.4f}]", delta,
                    f"{r['train_mean']:.4f}", f"{r['opt_state_bytes']:,}",
                    len(r["seeds"]), r["diverged"]])
    if table:
      sections.append(f"### {group} (relative to {baseline})\n\n" + _common.markdown_table(
          ["optimizer", "val loss mean ± std", "[min, max]", "vs baseline", "train loss",
           "state bytes", "seeds", "diverged"], table))
  return "\n\n".join(sections)


def plot_group(runs: list[dict], names: list[str], path, title: str) -> None:
  fig, (curve_ax, bar_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
  for name in names:
    mine = [r for r in runs if r["optimizer"] == name]
    if not mine:
      continue
    steps = [s for s, _ in mine[0]["validation_curve"]]
    values = np.array([[v for _, v in r["validation_curve"]] for r in mine
                       if len(r["validation_curve"]) == len(steps)])
    curve_ax.plot(steps, values.mean(0), marker="o", ms=3, label=name)
    curve_ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
  curve_ax.set(xlabel="optimizer update", ylabel="validation loss (mean, min-max over seeds)",
               title=title)
  curve_ax.legend(fontsize=7)
  present = [n for n in names if any(r["optimizer"] == n for r in runs)]
  finals = [[r["validation_loss"] for r in runs if r["optimizer"] == n] for n in present]
  bar_ax.bar(range(len(present)), [np.mean(f) for f in finals],
             yerr=[np.std(f, ddof=1) if len(f) > 1 else 0 for f in finals], capsize=3)
  lows = min(min(f) for f in finals)
  bar_ax.set_ylim(lows - 0.05, max(max(f) for f in finals) + 0.03)
  bar_ax.set_xticks(range(len(present)), present, rotation=35, ha="right", fontsize=7)
  bar_ax.set_ylabel("final validation loss (mean ± std)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 seed, 3 configurations, 30 steps")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=lm.Config().steps)
  parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
  args = parser.parse_args()
  start = time.perf_counter()
  config = lm.Config(steps=args.steps)
  seeds = args.seeds
  if args.quick:
    config = dataclasses.replace(config, steps=30, eval_every=10, final_eval_batches=8)
    seeds = [0]
  data = lm.load_shakespeare()
  params = lm.param_shapes(config, data[2])
  specs = all_specs(config, params)
  if args.quick:
    specs = quick_specs(specs)
  if args.only:
    specs = [s for s in specs if s.name in args.only]

  out = _common.results_dir("quality", args.quick)
  runs_dir = out / "runs"
  runs_dir.mkdir(exist_ok=True)
  todo = [(spec, seed) for seed in seeds for spec in specs
          if not (runs_dir / run_file_name(spec.name, seed)).exists()]
  print(f"{len(todo)} runs to do ({len(specs) * len(seeds) - len(todo)} already stored)")
  for spec, seed in tqdm(todo, desc="runs", mininterval=5.0):
    result = lm.train_run(spec, config, seed, data)
    result["config"] = dataclasses.asdict(config)
    (runs_dir / run_file_name(spec.name, seed)).write_text(json.dumps(result) + "\n")
    print(f"  {spec.name:<45} seed {seed}: val {result['validation_loss']:.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

  names = [s.name for s in specs]
  runs = [json.loads((runs_dir / run_file_name(n, s)).read_text())
          for n in names for s in seeds if (runs_dir / run_file_name(n, s)).exists()]
  rows = summarize(runs)
  info = _common.machine_info()
  command = _common.command_line()
  _common.write_json(out / "quality.json", {"command": command, "machine": info,
                                            "config": dataclasses.asdict(config),
                                            "seeds": seeds, "summary": rows})
  table = markdown(rows)
  (out / "quality.md").write_text(
      f"Command: `{command}`\n\nMachine: {_common.machine_line(info)}\n\n"
      f"Config: {dataclasses.asdict(config)}; seeds {seeds}\n\n{table}\n")
  groups = {g: [r["optimizer"] for r in rows if r["details"].get("group") == g]
            for g in ("momentum", "accumulation", "options")}
  plot_group(runs, groups["momentum"], out / "momentum.png", "momentum")
  plot_group(runs, groups["accumulation"], out / "accumulation.png", "accumulation (k=16)")
  plot_group(runs, ["flora r=16 kappa=20"] + groups["options"], out / "options.png",
             "Flora options at r=d/4, kappa=20")
  print(table)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
