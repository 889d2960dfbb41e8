"""Time of Flora's update step and whole train step, as ratios to naive Adafactor, on CPU.

Every timed function is jitted with its parameter and state buffers donated. The optimizers of
one model are timed in interleaved rounds (one call of each per round, after warm-up calls), so
a slow moment of a shared machine hits all of them alike; each reports the median over rounds,
and ratios are taken between medians of the same run.

* update step: ``tx.update`` + ``optax.apply_updates`` on fixed random gradients;
* train step: forward + backward + update of the Shakespeare character model.

Accumulating optimizers are timed per optimizer update, i.e. per 16 micro-steps (15 that only
accumulate, one that also runs Adafactor).

    python benchmarks/speed.py            # demo model and a mid-size (d 256, 4 layers, 3.2 M params) model
    python benchmarks/speed.py --quick    # demo model, four optimizers, 5 rounds

Writes ``benchmarks/results/speed/`` (``speed-quick/`` with --quick): speed.json, speed.md,
speed.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import _common  # noqa: F401  (puts examples/ on sys.path)
import flax.nnx as nnx
import jax
import matplotlib
import numpy as np
import optax

import flora_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import shakespeare_lm as lm  # noqa: E402

ACCUMULATE_EVERY = 16
KAPPA = 20  # the demo's default
QUICK_OPTIMIZERS = ("naive momentum", "naive accumulation", "flora momentum r=16",
                    "flora accumulation r=16")  # r = d/4 of the demo model


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  config: lm.Config


def optimizers(rank: int, learning_rate: float) -> dict[str, tuple[optax.GradientTransformation,
                                                                    int]]:
  """Name -> (transformation, micro-steps per update)."""
  factor = dict(min_dim_size_to_factor=lm.MIN_DIM_TO_FACTOR)
  adafactor = lambda: optax.adafactor(learning_rate, **factor)  # noqa: E731
  return {
      "adafactor (no momentum)": (adafactor(), 1),
      "naive momentum": (optax.adafactor(learning_rate, momentum=0.9, **factor), 1),
      f"flora momentum r={rank}": (flora_optax.flora_adafactor(
          learning_rate, rank, momentum=0.9, kappa=KAPPA, **factor), 1),
      f"flora momentum r={rank} orthogonal": (flora_optax.flora_adafactor(
          learning_rate, rank, momentum=0.9, kappa=KAPPA, projection="orthogonal", **factor), 1),
      f"galore r={rank}": (optax.contrib.galore(learning_rate, rank=rank,
                                                update_proj_gap=KAPPA), 1),
      "naive accumulation": (optax.MultiSteps(adafactor(), ACCUMULATE_EVERY), ACCUMULATE_EVERY),
      f"flora accumulation r={rank}": (flora_optax.flora_accumulate(
          adafactor(), ACCUMULATE_EVERY, rank), ACCUMULATE_EVERY),
  }


def update_step_fn(tx: optax.GradientTransformation) -> Callable:
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(step, donate_argnums=(0, 1))


def train_step_fn(tx: optax.GradientTransformation, graphdef) -> Callable:
  def loss(params, window):
    return lm.next_char_loss(nnx.merge(graphdef, params), window)

  def step(params, opt_state, window):
    grads = jax.grad(loss)(params, window)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(step, donate_argnums=(0, 1))


class Timed:
  """One optimizer's jitted step and its (donated, hence replaced) buffers."""

  def __init__(self, step, params, opt_state, inputs: list, micro_steps: int):
    self.step, self.params, self.opt_state = step, params, opt_state
    self.inputs, self.micro_steps = inputs, micro_steps
    self.seconds: list[float] = []

  def run_update(self) -> float:
    start = time.perf_counter()
    for i in range(self.micro_steps):
      self.params, self.opt_state = self.step(self.params, self.opt_state,
                                              self.inputs[i % len(self.inputs)])
    jax.block_until_ready((self.params, self.opt_state))
    return time.perf_counter() - start


def time_interleaved(timed: dict[str, Timed], warmup: int, rounds: int) -> dict[str, dict]:
  for t in timed.values():
    for _ in range(warmup):
      t.run_update()
  for _ in range(rounds):
    for t in timed.values():
      t.seconds.append(t.run_update())
  return {name: {"median_ms": 1e3 * statistics.median(t.seconds),
                 "min_ms": 1e3 * min(t.seconds), "rounds": len(t.seconds),
                 "micro_steps_per_update": t.micro_steps}
          for name, t in timed.items()}


def measure_model(model_spec: Model, vocab_size: int, train_ids, warmup: int,
                  rounds: int, quick: bool) -> dict[str, Any]:
  config = model_spec.config
  rank = config.d_model // 4
  model = lm.build_model(vocab_size, config, seed=0)
  graphdef, params = nnx.split(model)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  key = jax.random.key(1)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), params)
  windows = lm.fixed_batches(train_ids, ACCUMULATE_EVERY, config.batch_size, config.context)
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)  # noqa: E731  (donation)

  results = {}
  for kind in ("update step", "train step"):
    timed = {}
    for name, (tx, k) in optimizers(rank, config.learning_rate).items():
      if quick and name not in QUICK_OPTIMIZERS:
        continue  # compilation dominates a smoke run: time only the four main optimizers
      if kind == "update step":
        step, inputs = update_step_fn(tx), [grads]
      else:
        # An accumulating train step sees micro-batches of batch_size / k sequences.
        micro = config.batch_size // k
        step = train_step_fn(tx, graphdef)
        inputs = [w[:micro] for w in windows] if k > 1 else windows
      own_params = copy(params)
      timed[name] = Timed(step, own_params, tx.init(own_params), inputs, k)
    results[kind] = time_interleaved(timed, warmup, rounds)
  return {"model": model_spec.name, "num_params": int(num_params), "rank": rank,
          "config": dataclasses.asdict(config), "timings": results}


def ratio_rows(measured: list[dict]) -> list[list[Any]]:
  rows = []
  for m in measured:
    for kind, timings in m["timings"].items():
      naive_momentum = timings["naive momentum"]["median_ms"]
      naive_accumulation = timings["naive accumulation"]["median_ms"]
      for name, t in timings.items():
        baseline = naive_accumulation if t["micro_steps_per_update"] > 1 else naive_momentum
        rows.append([m["model"], kind, name, f"{t['median_ms']:.2f}",
                     f"{t['median_ms'] / baseline:.2f}",
                     "naive accumulation" if t["micro_steps_per_update"] > 1
                     else "naive momentum"])
  return rows


def plot(measured: list[dict], path) -> None:
  fig, axes = plt.subplots(1, len(measured), figsize=(6 * len(measured), 4), squeeze=False)
  for ax, m in zip(axes[0], measured):
    names = list(m["timings"]["update step"])
    x = np.arange(len(names))
    for offset, kind in ((-0.2, "update step"), (0.2, "train step")):
      ax.bar(x + offset, [m["timings"][kind][n]["median_ms"] for n in names], 0.4, label=kind)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("ms per optimizer update (median)")
    ax.set_title(f"{m['model']} ({m['num_params'] / 1e6:.2f} M params)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="demo model, four optimizers, 5 rounds")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  start = time.perf_counter()
  rounds = 5 if args.quick else args.rounds
  warmup = 1 if args.quick else args.warmup
  train_ids, _, vocab_size = lm.load_shakespeare()
  models = [Model("demo (d 64, 2 layers)", lm.Config())]
  if not args.quick:
    models.append(Model("mid (d 256, 4 layers)",
                        lm.Config(d_model=256, num_layers=4, num_heads=8)))
  measured = [measure_model(m, vocab_size, train_ids, warmup, rounds, args.quick) for m in models]

  out = _common.results_dir("speed", args.quick)
  info = _common.machine_info()
  command = _common.command_line()
  _common.write_json(out / "speed.json", {"command": command, "machine": info,
                                          "rounds": rounds, "warmup": warmup,
                                          "results": measured})
  table = _common.markdown_table(
      ["model", "timed", "optimizer", "median ms / update", "ratio", "ratio to"],
      ratio_rows(measured))
  (out / "speed.md").write_text(f"Command: `{command}`\n\nMachine: {_common.machine_line(info)}"
                                f"\n\n{table}\n")
  plot(measured, out / "speed.png")
  print(f"Machine: {_common.machine_line(info)}\n")
  print(table)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
