"""The main job: Flora's compressed momentum and accumulation on a Shakespeare character model.

Trains the same small Flax NNX transformer five times with Adafactor:

  (a) no momentum            optax.adafactor(lr)
  (b) naive momentum         optax.adafactor(lr, momentum=0.9)
  (c) Flora momentum         flora_optax.flora_adafactor(lr, rank, momentum=0.9, kappa=kappa)
  (d) naive accumulation     optax.MultiSteps(optax.adafactor(lr), 16)
  (e) Flora accumulation     flora_optax.flora_accumulate(optax.adafactor(lr), 16, rank)

and prints a table (optimizer-state bytes, ratio to naive momentum, median update time, final
train and validation loss), Flora's memory report, a loss-curve PNG and a JSON of every number.

    python examples/shakespeare_demo.py            # ~70 s on 2 idle CPU cores (measured)
    python examples/shakespeare_demo.py --quick    # ~30 s smoke run

Accumulation runs cut each batch of 16 sequences into 16 micro-batches of one sequence, so every
optimizer update of every run sees the same characters (see ``shakespeare_lm``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import flora_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import shakespeare_lm as lm  # noqa: E402

ACCUMULATE_EVERY = lm.ACCUMULATE_EVERY
MOMENTUM = lm.MOMENTUM
# Resample the momentum's projection every 100 steps: a 300-step run sees 3 projections. The
# paper's 1000 would keep a short run in one rank-r subspace (like a frozen LoRA). Resampling
# more often is not free either: each unbiased transfer adds noise of norm ~sqrt(d/rank) times
# the state's. On this model (benchmarks/quality.py, 3 seeds, 300 steps) kappa = 100 beat
# kappa = 20 at every rank; see docs/benchmarks.md.
DEFAULT_KAPPA = 100


def optimizer_specs(learning_rate: float, rank: int, kappa: int) -> list[lm.OptimizerSpec]:
  """The five optimizers of the demo; ``make(seed)`` seeds Flora's projections."""
  factor = dict(min_dim_size_to_factor=lm.MIN_DIM_TO_FACTOR)
  adafactor = lambda: optax.adafactor(learning_rate, **factor)  # noqa: E731
  return [
      lm.OptimizerSpec("no momentum", lambda seed: adafactor()),
      lm.OptimizerSpec("naive momentum", lambda seed: optax.adafactor(
          learning_rate, momentum=MOMENTUM, **factor)),
      lm.OptimizerSpec("flora momentum", lambda seed: flora_optax.flora_adafactor(
          learning_rate, rank, momentum=MOMENTUM, kappa=kappa, seed=seed, **factor),
          details={"rank": rank, "kappa": kappa}),
      lm.OptimizerSpec("naive accumulation", lambda seed: optax.MultiSteps(
          adafactor(), ACCUMULATE_EVERY), accumulate_every=ACCUMULATE_EVERY),
      lm.OptimizerSpec("flora accumulation", lambda seed: flora_optax.flora_accumulate(
          adafactor(), ACCUMULATE_EVERY, rank, seed=seed),
          accumulate_every=ACCUMULATE_EVERY, details={"rank": rank}),
  ]


def table(results: list[dict]) -> str:
  naive_bytes = next(r["opt_state_bytes"] for r in results if r["optimizer"] == "naive momentum")
  header = (f"{'optimizer':<20} {'state bytes':>12} {'/ naive mom.':>12} {'ms / update':>12} "
            f"{'train loss':>11} {'val loss':>9}")
  lines = [header, "-" * len(header)]
  for r in results:
    lines.append(f"{r['optimizer']:<20} {r['opt_state_bytes']:>12,d} "
                 f"{r['opt_state_bytes'] / naive_bytes:>12.3f} {r['median_update_ms']:>12.1f} "
                 f"{r['final_train_loss']:>11.4f} {r['validation_loss']:>9.4f}")
  return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
  fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    losses = np.asarray(r["train_loss_curve"])
    window = max(1, len(losses) // 30)  # smooth single-batch noise
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    # Dashed: accumulation (naive accumulation retraces "no momentum" on the same data).
    style = "--" if r["accumulate_every"] > 1 else "-"
    train_ax.plot(np.arange(window, len(losses) + 1), smooth, style, label=r["optimizer"])
    steps, values = zip(*r["validation_curve"])
    val_ax.plot(steps, values, style, marker="o", ms=3, label=r["optimizer"])
  train_ax.set(xlabel="optimizer update", ylabel="train loss (nats/char, smoothed)",
               title=title)
  val_ax.set(xlabel="optimizer update", ylabel="validation loss (nats/char)")
  val_ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args() -> argparse.Namespace:
  defaults = lm.Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=defaults.steps,
                      help="optimizer updates per run (accumulation: 16 micro-steps each)")
  parser.add_argument("--rank", type=int, default=defaults.d_model // 4,
                      help="Flora rank (default d_model/4)")
  parser.add_argument("--kappa", type=int, default=DEFAULT_KAPPA,
                      help="resample Flora's momentum projection every kappa steps")
  parser.add_argument("--lr", type=float, default=defaults.learning_rate)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=Path("runs/demo"))
  parser.add_argument("--quick", action="store_true", help="~30 s smoke version (CI)")
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  start = time.perf_counter()
  steps = min(args.steps, 40) if args.quick else args.steps
  config = dataclasses.replace(
      lm.Config(), steps=steps, learning_rate=args.lr,
      eval_every=max(1, steps // 6), final_eval_batches=8 if args.quick else 64)
  data = lm.load_shakespeare()
  print(f"Shakespeare: {len(data[0]):,} train / {len(data[1]):,} validation characters, "
        f"vocabulary {data[2]}; jax {jax.__version__} on {jax.default_backend()}")
  specs = optimizer_specs(config.learning_rate, args.rank, args.kappa)
  results = []
  for spec in specs:
    with tqdm(total=config.steps, desc=f"{spec.name:<20}", unit="upd", mininterval=2.0) as bar:
      results.append(lm.train_run(spec, config, args.seed, data, progress=bar.update))

  print()
  print(table(results))
  params = lm.param_shapes(config, data[2])
  print(f"\nFlora momentum buffer (rank {args.rank}; the DCT projection, 0.2's default), from "
        f"flora_optax.memory_report:")
  print(flora_optax.memory_report(params, rank=args.rank))
  print(f"\nFlora accumulator (rank {args.rank}; the two-sided sketch, 0.2's default):")
  print(flora_optax.memory_report(params, rank=args.rank, transform="accumulate"))

  args.out.mkdir(parents=True, exist_ok=True)
  plot(results, args.out / "loss_curves.png",
       f"Shakespeare chars, Adafactor lr {config.learning_rate}, rank {args.rank}, "
       f"kappa {args.kappa}")
  payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "config": dataclasses.asdict(config), "jax": jax.__version__,
             "optax": optax.__version__, "results": results,
             "wall_seconds": time.perf_counter() - start}
  (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
  print(f"\nwrote {args.out / 'loss_curves.png'} and {args.out / 'results.json'} "
        f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
