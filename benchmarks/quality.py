"""Does a compressed buffer train as well as a full one? Two tasks, 3 seeds, equal memory.

Every compressed leaf runs at rank d/4 (d = its compressed side); the two-sided sketch at the
same rank holds the same memory (``rank`` means ``≈ rank × max(n, m)`` numbers for every
sketch, see ``docs/spec.md``). Each row is trained from scratch on 3 seeds (seed = init, data
order and sketch seed); the tables give mean ± sample std and the standard error of the final
held-out loss, and the ratio to the naive (uncompressed) buffer.

1. ``fmnist``: a small CNN on Fashion-MNIST (conv 3x3x1x16, conv 3x3x16x32, dense 1568x32,
   dense 32x10; 2x2 max-pools), AdamW (b1 0.9, weight decay 1e-4), 300 updates of batch 64.
   Conv kernels ``(h, w, in, out)`` go through the >2-D path: viewed as rows = (h, w, in),
   cols = out. Every leaf with a side of 32 is compressed at rank 8 (= 32/4); the 16-wide first
   conv and the 10-wide head are left exact (``mask``). Rows: no momentum (Adam with b1 = 0,
   as ``scale_by_rms`` so that no unused first-moment buffer is counted), naive momentum
   (``optax.adamw``), ``flora_adamw`` with the projection (gaussian, dct, gaussian +
   ``emit="residual"``) and the two-sided sketch (plain and residual), and GaLore
   (``optax.contrib.galore``: Adam in an SVD subspace) at ranks 8 and 16. Accumulation (k = 8
   micro-batches of 8): ``optax.MultiSteps(adamw, 8)`` against ``flora_accumulate(adamw, 8, 8)``
   (projection, two-sided). Learning rates: the best on seed 0 of a grid for no momentum and
   for naive momentum; the Flora projection rows the better of naive's and half of it (a
   projection's decompressed momentum is ≈ sqrt(1 + d/r) = 2.2x too long); the other rows
   naive's. (SGD + momentum was tried first and dropped: at batch 64, momentum did not beat
   plain SGD at its best learning rate, so it could not tell compressed momenta apart.)
2. ``shakespeare``: the character transformer of ``examples/shakespeare_lm.py`` in the demo's
   config (d = 64, 2 layers, context 64, batch 16, Adafactor relative step 3e-2), 500 updates,
   rank 16 = d/4 on every matrix except the embedding, kappa 100. Rows: no momentum, naive
   (``optax.adafactor(momentum=0.9)``), ``flora_adafactor`` with the projection (gaussian,
   gaussian + ``emit="residual"``, dct) and the two-sided sketch; accumulation (k = 8
   micro-batches of 2 sequences) naive ``MultiSteps`` against ``flora_accumulate``
   (projection, two-sided) around plain Adafactor.

Flora options not named are the library's defaults (gaussian projection, least-squares
transfer, ``emit="compressed"``, ``momentum_position="after_factored_rms"``).

Training calls one jitted step per micro-batch (an accumulating row makes k calls per update,
as any ``optax.MultiSteps`` loop does); every row of a task sees the same data in the same order
for a given seed.

Every run is stored as it finishes (``benchmarks/runs/quality/<task>-<row>-seed<n>.json``, not
committed) and skipped when found, so an interrupted sweep resumes; the tables and plots are
rebuilt from the stored runs.

    python -m benchmarks.quality                       # both tasks, 3 seeds
    python -m benchmarks.quality --tasks fmnist        # one task
    python -m benchmarks.quality --quick               # CI smoke test: tiny runs, 1 seed

Writes quality.json and quality.md into ``benchmarks/results/quality/`` and
quality_fmnist.png, quality_shakespeare.png (final held-out loss against optimizer-state
memory relative to naive) into ``docs/img/benchmarks/`` (``--quick``: everything into
``benchmarks/results/quality-quick/`` and ``benchmarks/runs/quality-quick/``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import flora_optax
from benchmarks import _harness
from examples import shakespeare_lm as lm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SEEDS = (0, 1, 2)
# --quick (CI): these rows only, on tiny runs.
QUICK_ROWS = ("naive momentum", "flora two_sided", "flora projection",
              "flora accumulation two_sided")
BETA = 0.9

# ------------------------------------------------------------------------------ Fashion-MNIST

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  steps: int = 300               # optimizer updates (19,200 images, 0.32 epoch: CPU budget)
  batch_size: int = 64
  chunk: int = 100               # an evaluation point every chunk updates
  rank: int = 8                  # d/4 for the 32-wide compressed side of every compressed leaf
  kappa: int = 100
  accumulate_every: int = 8
  # Learning-rate grids, measured on seed 0 (best by final test loss).
  weight_decay: float = 1e-4
  lr_none: tuple = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
  lr_naive: tuple = (1e-3, 2e-3, 4e-3)


def _idx(name: str) -> np.ndarray:
  if not (FMNIST_DIR / name).exists():
    raise FileNotFoundError(f"{FMNIST_DIR / name} not found: the Fashion-MNIST idx files come "
                            "from the Debian package: apt-get install -y dataset-fashion-mnist")
  with gzip.open(FMNIST_DIR / name) as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist():
  """(train images, train labels, test images, test labels); images uint8 (N, 28, 28, 1)."""
  return (_idx("train-images-idx3-ubyte.gz")[..., None], _idx("train-labels-idx1-ubyte.gz"),
          _idx("t10k-images-idx3-ubyte.gz")[..., None], _idx("t10k-labels-idx1-ubyte.gz"))


def cnn_init(seed: int) -> dict:
  keys = jax.random.split(jax.random.key(seed), 4)

  def he(key, shape, fan_in):
    return jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in)

  return {
      "conv1": {"kernel": he(keys[0], (3, 3, 1, 16), 9), "bias": jnp.zeros(16)},
      "conv2": {"kernel": he(keys[1], (3, 3, 16, 32), 144), "bias": jnp.zeros(32)},
      "dense": {"kernel": he(keys[2], (7 * 7 * 32, 32), 7 * 7 * 32), "bias": jnp.zeros(32)},
      "head": {"kernel": he(keys[3], (32, 10), 32) / np.sqrt(2.0), "bias": jnp.zeros(10)},
  }


def cnn_logits(params: dict, images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) / 255.0 - 0.286

  def conv(x, p):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + p["bias"])
    return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

  x = conv(conv(x, params["conv1"]), params["conv2"])
  x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def cnn_loss(params, batch):
  images, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(cnn_logits(params, images),
                                                         labels).mean()


def galore_dims(params):
  """GaLore's matrix views: conv2 as rows = (h, w, in), cols = out (like Flora's); dense as is;
  the leaves Flora leaves exact are not projected either."""
  dims = {"conv2": optax.contrib.GaLoreDimensionNumbers((0, 1, 2), 3),
          "dense": optax.contrib.GaLoreDimensionNumbers(0, 1)}
  return {name: {"kernel": dims.get(name), "bias": None} for name in params}


def cnn_mask(params):
  """Compress the leaves with a 32-wide side (conv2, dense); keep the rest exact."""
  return {name: {"kernel": name in ("conv2", "dense"), "bias": False} for name in params}


# ------------------------------------------------------------------------------ Shakespeare

# The demo's model (d 64, 2 layers, context 64, batch 16, relative step 3e-2) for 500 updates:
# a bigger model or a longer run does not fit 3 seeds x 7 rows into the CPU budget.
LM = lm.Config(steps=500, eval_every=100, eval_batches=4, final_eval_batches=32)


@dataclasses.dataclass(frozen=True)
class LMRun:
  config: lm.Config = LM
  chunk: int = 100
  rank: int = 16                 # d_model / 4
  kappa: int = 100
  accumulate_every: int = 8


# ------------------------------------------------------------------------------ rows


@dataclasses.dataclass(frozen=True)
class Row:
  """One optimizer of a task: ``make(lr, seed)``; ``lrs``: its learning-rate candidates (the
  first entry alone is used unless the grid is resolved on seed 0)."""

  name: str
  group: str                     # "momentum" or "accumulation"
  make: Callable[[float, int], optax.GradientTransformation]
  lrs: tuple
  k: int = 1
  details: dict = dataclasses.field(default_factory=dict)


def fmnist_rows(cfg: CNNConfig, lr: dict) -> list[Row]:
  """``lr``: the chosen learning rates (``none``, ``naive``); empty while the grid is measured."""
  r, kappa, k, wd = cfg.rank, cfg.kappa, cfg.accumulate_every, cfg.weight_decay

  def adam_none(lr_):
    # Adam with b1 = 0, without the unused first-moment buffer that optax.adamw(b1=0) keeps.
    return optax.chain(optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False, bias_correction=True),
                       optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr_))

  def adam_naive(lr_):
    return optax.adamw(lr_, b1=BETA, weight_decay=wd)

  naive_lr = lr.get("naive")
  rows = [
      Row("no momentum", "momentum", lambda lr_, seed: adam_none(lr_), cfg.lr_none,
          details={"optimizer": "adam b1=0 (scale_by_rms)"}),
      Row("naive momentum", "momentum", lambda lr_, seed: adam_naive(lr_), cfg.lr_naive,
          details={"optimizer": "optax.adamw"}),
  ]
  flora_lrs = (naive_lr, naive_lr / 2) if naive_lr else ()
  for name, options, lrs in (
      ("flora projection gaussian", dict(sketch="projection", projection="gaussian"), flora_lrs),
      ("flora projection dct", dict(sketch="projection", projection="dct"), flora_lrs),
      ("flora projection gaussian residual",
       dict(sketch="projection", projection="gaussian", emit="residual"), flora_lrs),
      ("flora two_sided", dict(sketch="two_sided"), (naive_lr,)),
      ("flora two_sided residual", dict(sketch="two_sided", emit="residual"), (naive_lr,)),
  ):
    rows.append(Row(name, "momentum",
                    lambda lr_, seed, o=options: flora_optax.flora_adamw(
                        lr_, r, b1=BETA, weight_decay=wd, kappa=kappa, seed=seed, mask=cnn_mask,
                        **o),
                    lrs, details={"rank": r, "kappa": kappa, **options}))
  # GaLore (Adam in the subspace, its own default) with its projector from an SVD of the
  # gradient every kappa steps.
  for g_rank in (r, 2 * r):
    rows.append(Row(f"galore r={g_rank}", "momentum",
                    lambda lr_, seed, g=g_rank: optax.contrib.galore(
                        lr_, rank=g, update_proj_gap=kappa, weight_decay=wd,
                        weight_dimension_numbers=galore_dims),
                    (naive_lr,), details={"rank": g_rank, "update_proj_gap": kappa}))

  acc = (naive_lr,)
  rows.append(Row("naive accumulation (MultiSteps)", "accumulation",
                  lambda lr_, seed: optax.MultiSteps(adam_naive(lr_), k), acc, k=k))
  for sketch in ("projection", "two_sided"):
    rows.append(Row(f"flora accumulation {sketch}", "accumulation",
                    lambda lr_, seed, s=sketch: flora_optax.flora_accumulate(
                        adam_naive(lr_), k, r, seed=seed, sketch=s, mask=cnn_mask),
                    acc, k=k, details={"rank": r, "sketch": sketch}))
  return rows


def shakespeare_rows(run: LMRun, lr: dict) -> list[Row]:
  r, kappa, k, base = run.rank, run.kappa, run.accumulate_every, run.config.learning_rate
  factor = dict(min_dim_size_to_factor=lm.MIN_DIM_TO_FACTOR)
  mask = lm.embedding_mask
  rows = [
      Row("no momentum", "momentum", lambda lr_, seed: optax.adafactor(lr_, **factor), (base,)),
      Row("naive momentum", "momentum",
          lambda lr_, seed: optax.adafactor(lr_, momentum=BETA, **factor), (base,)),
  ]
  for name, options in (("flora projection", dict(sketch="projection")),
                        ("flora two_sided", dict(sketch="two_sided")),
                        # The CNN's two best compressed momenta, checked here too.
                        ("flora projection residual", dict(sketch="projection", emit="residual")),
                        ("flora projection dct", dict(sketch="projection", projection="dct"))):
    rows.append(Row(name, "momentum",
                    lambda lr_, seed, o=options: flora_optax.flora_adafactor(
                        lr_, r, momentum=BETA, kappa=kappa, seed=seed, mask=mask, **factor, **o),
                    (base,), details={"rank": r, "kappa": kappa, **options}))
  rows.append(Row("naive accumulation (MultiSteps)", "accumulation",
                  lambda lr_, seed: optax.MultiSteps(optax.adafactor(lr_, **factor), k),
                  (base,), k=k))
  for sketch in ("projection", "two_sided"):
    rows.append(Row(f"flora accumulation {sketch}", "accumulation",
                    lambda lr_, seed, s=sketch: flora_optax.flora_accumulate(
                        optax.adafactor(lr_, **factor), k, r, seed=seed, sketch=s, mask=mask),
                    (base,), k=k, details={"rank": r, "sketch": sketch}))
  del lr
  return rows


# ------------------------------------------------------------------------------ training


def train(loss_fn, params, tx, sample, steps, chunk, k, evaluate) -> dict[str, Any]:
  """``steps`` optimizer updates, each over ``k`` micro-batches (``sample(step)`` returns the
  update's batch, leading axis divisible by k): one jitted call per micro-batch, as a training
  loop with ``optax.MultiSteps`` runs (a ``lax.scan`` over steps is ~4x slower on XLA's CPU
  backend). An evaluation point every ``chunk`` updates."""
  state = tx.init(params)
  state_bytes = flora_optax.state_bytes(state)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def micro(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  train_losses, curve, seconds = [], [], []
  for step in range(steps):
    batch = sample(step)
    start = time.perf_counter()
    losses = []
    for i in range(k):
      part = jax.tree.map(lambda x: x[i * (len(x) // k):(i + 1) * (len(x) // k)], batch)
      params, state, loss = micro(params, state, part)
      losses.append(loss)
    loss = float(np.mean([float(x) for x in losses]))  # waits for the update
    seconds.append(time.perf_counter() - start)
    train_losses.append(loss)
    if not np.isfinite(loss):
      break
    if (step + 1) % chunk == 0 or step + 1 == steps:
      curve.append((step + 1, evaluate(params, final=False)["loss"]))
  diverged = not np.all(np.isfinite(train_losses))
  final = {"loss": float("nan")} if diverged else evaluate(params, final=True)
  return {"state_bytes": state_bytes, "train_loss_curve": train_losses,
          "validation_curve": curve, "final": final,
          "final_train_loss": float(np.mean(train_losses[-max(1, steps // 10):])),
          "diverged": diverged,
          "seconds_per_update": float(np.median(seconds[2:] or seconds))}


def run_fmnist(row: Row, lr: float, seed: int, cfg: CNNConfig, data) -> dict:
  train_x, train_y, test_x, test_y = data
  rng = np.random.default_rng(seed)
  per_epoch = len(train_x) // cfg.batch_size
  orders = {}

  def sample(step):
    epoch, i = divmod(step, per_epoch)
    if epoch not in orders:
      orders[epoch] = rng.permutation(len(train_x))
    idx = orders[epoch][i * cfg.batch_size:(i + 1) * cfg.batch_size]
    return train_x[idx], train_y[idx].astype(np.int32)

  eval_logits = jax.jit(cnn_logits)

  def evaluate(params, final):
    n = len(test_x) if final else 2000
    losses, correct = [], 0
    for i in range(0, n, 1000):
      logits = eval_logits(params, test_x[i:i + 1000])
      labels = test_y[i:i + 1000].astype(np.int32)
      losses.append(float(optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()))
      correct += int((np.asarray(logits).argmax(-1) == labels).sum())
    return {"loss": float(np.mean(losses)), "accuracy": correct / n}

  return train(cnn_loss, cnn_init(seed), row.make(lr, seed), sample, cfg.steps, cfg.chunk,
               row.k, evaluate)


def run_shakespeare(row: Row, lr: float, seed: int, run: LMRun, data) -> dict:
  config = run.config
  train_ids, validation_ids, vocab = data
  model = lm.build_model(vocab, config, seed)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)  # plain arrays: the optimizers see a dict of matrices

  def loss_fn(params, window):
    full = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(full, params)
    return lm.next_char_loss(nnx.merge(graphdef, full), window)

  stream = lm.batches(train_ids, config.batch_size, config.context, seed)
  curve_windows = lm.fixed_batches(validation_ids, config.eval_batches, config.batch_size,
                                   config.context)
  final_windows = lm.fixed_batches(validation_ids, config.final_eval_batches,
                                   config.batch_size, config.context)
  eval_loss = jax.jit(loss_fn)

  def evaluate(params, final):
    windows = final_windows if final else curve_windows
    return {"loss": float(np.mean([float(eval_loss(params, w)) for w in windows]))}

  return train(loss_fn, params, row.make(lr, seed), lambda step: next(stream), config.steps,
               run.chunk, row.k, evaluate)


# ------------------------------------------------------------------------------ sweep


def safe(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name)


class Sweep:
  """Runs (task, row, lr, seed), each stored in its own JSON file and skipped when found."""

  def __init__(self, task: str, runner, runs_dir: Path, start: float):
    self.task, self.runner, self.dir, self.start = task, runner, runs_dir, start

  def path(self, row: Row, lr: float, seed: int) -> Path:
    return self.dir / f"{self.task}-{safe(row.name)}-lr{lr:g}-seed{seed}.json"

  def get(self, row: Row, lr: float, seed: int) -> dict:
    path = self.path(row, lr, seed)
    if path.exists():
      return json.loads(path.read_text())
    result = self.runner(row, lr, seed)
    result.update(task=self.task, optimizer=row.name, group=row.group, details=row.details,
                  learning_rate=lr, seed=seed, accumulate_every=row.k)
    path.write_text(json.dumps(result) + "\n")
    print(f"  [{self.task}] {row.name:<38} lr {lr:<7g} seed {seed}: held-out "
          f"{result['final']['loss']:.4f}  ({result['seconds_per_update'] * 1e3:.0f} ms/update,"
          f" {time.perf_counter() - self.start:.0f} s)", flush=True)
    return result

  def best_lr(self, row: Row) -> float:
    """The learning rate of ``row.lrs`` with the lowest final held-out loss on seed 0."""
    if len(row.lrs) == 1:
      return row.lrs[0]
    losses = {lr: self.get(row, lr, 0)["final"]["loss"] for lr in row.lrs}
    return min(losses, key=lambda lr: np.inf if not np.isfinite(losses[lr]) else losses[lr])


def summarize(runs: list[dict], naive: str = "naive momentum") -> list[dict]:
  rows = []
  for name in dict.fromkeys(r["optimizer"] for r in runs):
    mine = [r for r in runs if r["optimizer"] == name]
    loss = np.array([r["final"]["loss"] for r in mine])
    n = len(loss)
    std = float(np.std(loss, ddof=1)) if n > 1 else 0.0
    row = {"optimizer": name, "group": mine[0]["group"], "details": mine[0]["details"],
           "learning_rate": mine[0]["learning_rate"], "seeds": [r["seed"] for r in mine],
           "loss_mean": float(np.mean(loss)), "loss_std": std, "loss_se": std / np.sqrt(n),
           "losses": loss.tolist(), "diverged": int(sum(r["diverged"] for r in mine)),
           "state_bytes": mine[0]["state_bytes"],
           "seconds_per_update": float(np.median([r["seconds_per_update"] for r in mine])),
           "train_loss_mean": float(np.mean([r["final_train_loss"] for r in mine]))}
    if "accuracy" in mine[0]["final"]:
      row["accuracy_mean"] = float(np.mean([r["final"]["accuracy"] for r in mine]))
    rows.append(row)
  by = {r["optimizer"]: r for r in rows}
  for r in rows:
    base = by.get(naive if r["group"] == "momentum" else "naive accumulation (MultiSteps)")
    if base:
      r["ratio_to_naive"] = r["loss_mean"] / base["loss_mean"]
      r["state_to_naive"] = r["state_bytes"] / base["state_bytes"]
    if r["group"] == "momentum" and "no momentum" in by and naive in by:
      floor = min(by["no momentum"]["loss_mean"], by[naive]["loss_mean"])
      r["ratio_to_min_naive_none"] = r["loss_mean"] / floor
      none = by["no momentum"]
      # Below no momentum by more than two standard errors of the difference?
      se = np.hypot(r["loss_se"], none["loss_se"])
      r["below_none_by_2se"] = bool(none["loss_mean"] - r["loss_mean"] > 2 * se)
  return rows


def markdown(task: str, rows: list[dict], header: str) -> str:
  has_acc = any("accuracy_mean" in r for r in rows)
  out = [f"### {task}\n\n{header}"]
  for group, base in (("momentum", "naive momentum"),
                      ("accumulation", "naive accumulation (MultiSteps)")):
    table = []
    for r in (r for r in rows if r["group"] == group):
      cells = [r["optimizer"], f"{r['learning_rate']:g}",
               f"{r['loss_mean']:.4f} ± {r['loss_std']:.4f}", f"{r['loss_se']:.4f}",
               f"{r.get('ratio_to_naive', float('nan')):.4f}"]
      if group == "momentum":
        cells += [f"{r.get('ratio_to_min_naive_none', float('nan')):.4f}",
                  "yes" if r.get("below_none_by_2se") else "no"]
      if has_acc:
        cells.append(f"{100 * r['accuracy_mean']:.2f}")
      cells += [f"{r['state_bytes']:,}", f"{r.get('state_to_naive', float('nan')):.3f}",
                f"{1e3 * r['seconds_per_update']:.0f}", len(r["seeds"]), r["diverged"]]
      table.append(cells)
    if not table:
      continue
    head = ["optimizer", "lr", "held-out loss mean ± std", "s.e.", f"/ {base}"]
    if group == "momentum":
      head += ["/ min(naive, none)", "< none by 2 s.e."]
    if has_acc:
      head.append("test acc %")
    head += ["state bytes", "state / naive", "ms / update", "seeds", "diverged"]
    out.append(f"#### {group}\n\n" + _harness.markdown_table(head, table))
  return "\n\n".join(out)


def plot(task: str, rows: list[dict], path: Path, title: str) -> None:
  fig, ax = plt.subplots(figsize=(11, 5))
  markers = {"momentum": "o", "accumulation": "s"}
  for r in rows:
    if "state_to_naive" not in r:
      continue
    ax.errorbar(r["state_to_naive"], r["loss_mean"], yerr=r["loss_std"], fmt=markers[r["group"]],
                capsize=3, label=f"{r['group']}: {r['optimizer']}")
  ax.set(xlabel="optimizer state / naive optimizer state (state_bytes)",
         ylabel="final held-out loss (mean ± std over seeds)", title=title)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def do_task(task: str, args, runs_dir: Path, start: float) -> tuple[list[dict], str, dict]:
  seeds = [0] if args.quick else args.seeds
  if task == "fmnist":
    cfg = CNNConfig()
    if args.quick:
      cfg = dataclasses.replace(cfg, steps=20, chunk=10, lr_none=(1e-3,), lr_naive=(2e-3,))
    data = load_fmnist()
    if args.quick:
      data = (data[0][:4096], data[1][:4096], data[2][:2000], data[3][:2000])
    sweep = Sweep(task, lambda row, lr, seed: run_fmnist(row, lr, seed, cfg, data), runs_dir,
                  start)
    grid = fmnist_rows(cfg, {})
    chosen = {"none": sweep.best_lr(grid[0]), "naive": sweep.best_lr(grid[1])}
    rows = fmnist_rows(cfg, chosen)
    setting = dataclasses.asdict(cfg)
    header = (f"Small CNN (conv 16, conv 32, dense 32, head 10), AdamW (b1 {BETA}, b2 0.999, "
              f"weight decay {cfg.weight_decay}), {cfg.steps} updates of batch {cfg.batch_size}, "
              f"rank {cfg.rank} (d/4 of the 32-wide side of conv2 and dense), kappa {cfg.kappa}; "
              f"held-out = the 10,000 test images. Learning rates: best on seed 0 of none "
              f"{cfg.lr_none}, naive {cfg.lr_naive}; Flora projection rows the better of naive's "
              f"and half of it; the other rows naive's.")
  else:
    run = LMRun()
    if args.quick:
      run = dataclasses.replace(run, config=dataclasses.replace(
          LM, d_model=32, num_layers=1, context=32, batch_size=8, steps=16, eval_batches=2,
          final_eval_batches=4), chunk=8, rank=8)
    data = lm.load_shakespeare()
    sweep = Sweep(task, lambda row, lr, seed: run_shakespeare(row, lr, seed, run, data),
                  runs_dir, start)
    rows = shakespeare_rows(run, {})
    setting = {**dataclasses.asdict(run)}
    c = run.config
    header = (f"Character transformer of `examples/shakespeare_lm.py` (d {c.d_model}, "
              f"{c.num_layers} layers, context {c.context}), Adafactor (relative step "
              f"{c.learning_rate}, momentum {BETA}), {c.steps} updates of batch {c.batch_size}, "
              f"rank {run.rank} (d/4, embedding not compressed), kappa {run.kappa}, "
              f"accumulation k = {run.accumulate_every}; held-out = "
              f"{c.final_eval_batches * c.batch_size * c.context:,} validation characters "
              f"(nats/char).")
  if args.quick:
    rows = [r for r in rows if r.name in QUICK_ROWS]
  if args.only:
    rows = [r for r in rows if r.name in args.only]
  chosen_runs = []
  for row in rows:
    lr = sweep.best_lr(row)
    for seed in seeds:
      chosen_runs.append(sweep.get(row, lr, seed))
  # Every learning-rate probe of seed 0, for the record.
  probes = sorted(({"optimizer": p["optimizer"], "learning_rate": p["learning_rate"],
                    "loss": p["final"]["loss"]}
                   for p in map(lambda f: json.loads(f.read_text()),
                                runs_dir.glob(f"{task}-*-seed0.json"))),
                  key=lambda p: (p["optimizer"], p["learning_rate"]))
  return summarize(chosen_runs), header, {"setting": setting, "lr_probes": probes}


def main() -> None:
  parser = _harness.arg_parser(__doc__, "1 seed, tiny models, few steps (CI smoke test)")
  parser.add_argument("--tasks", nargs="+", default=["fmnist", "shakespeare"],
                      choices=["fmnist", "shakespeare"])
  parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
  parser.add_argument("--only", nargs="*", default=None, help="run only these rows")
  args = parser.parse_args()
  start = time.perf_counter()
  runs_dir = _harness.raw_dir("quality", args.quick, args.out)
  out = _harness.results_dir("quality", args.quick, args.out)
  figures = _harness.figures_dir("quality", args.quick, args.out)
  previous = out / "quality.json"
  payload = {"tasks": {}}
  if previous.exists() and not args.quick:
    payload["tasks"] = json.loads(previous.read_text()).get("tasks", {})
  for task in args.tasks:
    rows, header, extra = do_task(task, args, runs_dir, start)
    payload["tasks"][task] = {"header": header, "summary": rows, **extra}
    plot(task, rows, figures / f"quality_{task}.png",
         {"fmnist": "Fashion-MNIST CNN, AdamW, rank d/4, 3 seeds",
          "shakespeare": "Shakespeare char LM, Adafactor, rank d/4, 3 seeds"}[task])
  tables = "\n\n".join(markdown(t, v["summary"], v["header"])
                       for t, v in payload["tasks"].items())
  payload["seconds"] = time.perf_counter() - start
  _harness.write_report(out, "quality", payload, tables)
  print(tables)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
