"""Time of Flora's update step and whole train step, as ratios to naive Adafactor, on CPU.

Every timed function is jitted with its parameter and state buffers donated. The optimizers of
one model are timed with ``_harness.time_interleaved``: interleaved rounds (one call of each
per round, after warm-up calls), so a slow moment of a shared machine hits all of them alike;
each reports the median over rounds with the interquartile range, and its ratio to the
baseline is the median of the per-round ratios.

* update step: ``tx.update`` + ``optax.apply_updates`` on fixed random gradients;
* train step: forward + backward + update of the Shakespeare character model.

Accumulating optimizers are timed per optimizer update, i.e. per 16 micro-steps (15 that only
accumulate, one that also runs Adafactor), and compared with naive accumulation; the others with
naive momentum.

    python -m benchmarks.speed            # demo model and a mid-size (d 256, 4 layers, 3.2 M params) model
    python -m benchmarks.speed --quick    # demo model, four optimizers, 5 rounds

Writes speed.json and speed.md into ``benchmarks/results/speed/`` and speed.png into
``docs/img/benchmarks/`` (``--quick``: all into ``benchmarks/results/speed-quick/``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import matplotlib
import numpy as np
import optax

import flora_optax
from benchmarks import _harness
from examples import shakespeare_lm as lm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ACCUMULATE_EVERY = lm.ACCUMULATE_EVERY
KAPPA = 20
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


class Stepper:
  """One optimizer's jitted step and its (donated, hence replaced) buffers; a call runs one
  optimizer update (``micro_steps`` calls of the step)."""

  def __init__(self, step, params, opt_state, inputs: list, micro_steps: int):
    self.step, self.params, self.opt_state = step, params, opt_state
    self.inputs, self.micro_steps = inputs, micro_steps

  def __call__(self):
    for i in range(self.micro_steps):
      self.params, self.opt_state = self.step(self.params, self.opt_state,
                                              self.inputs[i % len(self.inputs)])
    return self.params, self.opt_state


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
    steppers = {}
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
      steppers[name] = Stepper(step, own_params, tx.init(own_params), inputs, k)
    timings = _harness.time_interleaved(steppers, rounds, warmup=warmup)
    results[kind] = {}
    for name, timing in timings.items():
      k = steppers[name].micro_steps
      baseline = "naive accumulation" if k > 1 else "naive momentum"
      results[kind][name] = {**timing.summary(timings[baseline]), "ratio_to": baseline,
                             "micro_steps_per_update": k}
  return {"model": model_spec.name, "num_params": int(num_params), "rank": rank,
          "config": dataclasses.asdict(config), "timings": results}


def ratio_rows(measured: list[dict]) -> list[list[Any]]:
  return [[m["model"], kind, name, f"{t['ms']:.2f} ({t['ms_p25']:.2f}-{t['ms_p75']:.2f})",
           f"{t['ratio']:.2f} ({t['ratio_p25']:.2f}-{t['ratio_p75']:.2f})", t["ratio_to"]]
          for m in measured for kind, timings in m["timings"].items()
          for name, t in timings.items()]


def plot(measured: list[dict], path) -> None:
  fig, axes = plt.subplots(1, len(measured), figsize=(6 * len(measured), 4), squeeze=False)
  for ax, m in zip(axes[0], measured):
    names = list(m["timings"]["update step"])
    x = np.arange(len(names))
    for offset, kind in ((-0.2, "update step"), (0.2, "train step")):
      ax.bar(x + offset, [m["timings"][kind][n]["ms"] for n in names], 0.4, label=kind)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("ms per optimizer update (median)")
    ax.set_title(f"{m['model']} ({m['num_params'] / 1e6:.2f} M params)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = _harness.arg_parser(__doc__, "demo model, four optimizers, 5 rounds")
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

  out = _harness.results_dir("speed", args.quick, args.out)
  table = _harness.markdown_table(
      ["model", "timed", "optimizer", "median ms / update (IQR)", "ratio (IQR)", "ratio to"],
      ratio_rows(measured))
  info = _harness.write_report(out, "speed", {"rounds": rounds, "warmup": warmup,
                                              "results": measured}, table)
  plot(measured, _harness.figures_dir("speed", args.quick, args.out) / "speed.png")
  print(f"Machine: {_harness.machine_line(info)}\n")
  print(table)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
