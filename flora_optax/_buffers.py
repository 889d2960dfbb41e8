"""Trees of compressed buffers: the one pipeline every Flora transform is written against.

A buffer tree has the structure of the parameters. A compressed leaf is a :class:`Compressed`
node: its arrays (``parts``) are pytree children; its layout and the options that shaped it
are static metadata, so a state carries its own plan through ``jit``, checkpoints and
``jax.eval_shape``, and ``update`` never re-plans from the updates it is given. Leaves that
are not compressed are plain arrays with exactly ``optax``'s arithmetic.

The transforms use whole-tree operations only: :func:`init`, :func:`check`,
:func:`draw`, :func:`fold` (or :func:`compress` for a linear accumulation), :func:`decompress`,
:func:`transfer`, :func:`reset`, :func:`to_compute`, :func:`store`. The storage format (float32,
bfloat16, int8 with block scales) is the concern of :func:`init`, :func:`store` and
:func:`to_compute` only: an int8 array is an :class:`Int8Blocks` node wherever a float array
would be, and the arithmetic in between always sees float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _layout, _options, _sketches
from flora_optax._layout import LeafLayout


@functools.partial(jax.tree_util.register_dataclass, data_fields=["parts"],
                   meta_fields=["leaf", "sketch", "spec"])
@dataclasses.dataclass(frozen=True)
class Compressed:
  """One compressed leaf.

  Attributes:
    parts: the arrays of the sketch: ``{"c": ...}`` for a projection (``(*batch, n, rank)``
      or ``(*batch, rank, m)``), ``{"range": (*batch, N, k), "corange": (*batch, l, M)}`` for
      the two-sided sketch; with ``dtype="int8"`` each is an :class:`Int8Blocks` of that
      shape.
    leaf: static :class:`LeafLayout` (name, shape, matrix view, side, rank).
    sketch: the static compression method that reads and writes `parts`.
    spec: static options of the transform that made it, as ``(name, value)`` pairs.
  """

  parts: dict[str, jax.Array]
  leaf: LeafLayout
  sketch: _sketches.Sketch
  spec: tuple

  @property
  def options(self) -> dict[str, Any]:
    return dict(self.spec)


def is_compressed(x) -> bool:
  return isinstance(x, Compressed)


def _is_node(x) -> bool:
  return isinstance(x, (Compressed, Int8Blocks))


def map_leaves(fn, buffers, *rest):
  """``jax.tree.map`` over a buffer tree, a :class:`Compressed` node (or the
  :class:`Int8Blocks` of a plain leaf) counting as one leaf."""
  return jax.tree.map(fn, buffers, *rest, is_leaf=_is_node)


def nodes(buffers) -> list:
  return jax.tree.leaves(buffers, is_leaf=_is_node)


# ----------------------------------------------------------------------------- int8 storage

# Entries per int8 block along a buffer's last axis (a row shorter than this is one block).
# Smaller blocks track outliers better, larger ones cost less scale memory (4 bytes per
# block: 1.6% of the int8 bytes at 256, 0.2% at bitsandbytes' 2048). A Gaussian block's
# absmax, which sets the rounding step, grows like sqrt(2 ln B): 256 gives a step 15% finer
# than 2048 and within 13% of 64, whose scales would cost 6.3%. Projection buffers are
# ``(n, rank)`` or ``(rank, m)``: with rank <= 256 a row of the first kind (the sketch of one
# row of the gradient) is one block, so rows of very different norms never share a scale.
# docs/howto/int8.md gives the measurement (benchmarks/int8_blocks.py).
INT8_BLOCK = 256
# Largest code: symmetric [-127, 127], so +x and -x round alike and 0 is exact.
INT8_MAX = 127


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"],
                   meta_fields=["block"])
@dataclasses.dataclass(frozen=True)
class Int8Blocks:
  r"""An array stored as int8 codes with one float32 absmax scale per block.

  The last axis (length ``L``) is cut into ``ceil(L / block)`` blocks of ``block`` entries
  (the last one ragged); entry ``x`` of block ``b`` is stored as ``q = round(127 x / s_b)``
  with ``s_b = max_{block b} |x|`` and read back as ``x̂ = q · s_b / 127``, so

  .. math::  |x - \hat x| < s_b / 127 \ (\text{stochastic rounding}), \qquad
             |x - \hat x| \le s_b / 254 \ (\text{nearest}).

  An all-zero block has ``s_b = 0`` and reads back as zeros. A block holding a non-finite
  value (NaN or ±inf) stores ``s_b = NaN`` and codes 0: it reads back as NaN in every entry,
  so the problem stays visible (``optax.apply_if_finite`` and ``optax.skip_not_finite``
  catch it), and no other block changes. Finite input never gives NaN or inf, up to
  float32's largest value; a block whose absmax is below ``127 ×`` float32's smallest normal
  number (``1.5e-36``) is stored as zeros with scale 0 (XLA flushes subnormals anyway).

  Attributes:
    q: int8 codes, the logical shape ``(..., L)`` (no padding, so ``q`` shards like the
      float buffer it replaces).
    scale: float32 absmax of each block, shape ``(..., ceil(L / block))``.
    block: static block size (:data:`INT8_BLOCK`).
  """

  q: jax.Array
  scale: jax.Array
  block: int = INT8_BLOCK

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.q.shape)

  @property
  def dtype(self):
    return jnp.dtype(jnp.int8)

  @classmethod
  def zeros(cls, shape, block: int = INT8_BLOCK) -> "Int8Blocks":
    shape = tuple(shape)
    if not shape:
      raise ValueError("int8 storage needs at least one axis (scalars stay float32)")
    return cls(jnp.zeros(shape, jnp.int8),
               jnp.zeros(shape[:-1] + (num_blocks(shape[-1], block),), jnp.float32), block)


def is_int8(x) -> bool:
  return isinstance(x, Int8Blocks)


def num_blocks(length: int, block: int = INT8_BLOCK) -> int:
  return max(1, -(-length // block))


def _blocked(x, block):
  """``(..., L)`` as ``(..., num_blocks, min(L, block))``, zero-padding a ragged last block."""
  length = x.shape[-1]
  if length <= block:
    return x[..., None, :]
  pad = num_blocks(length, block) * block - length
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  # Explicit sizes, not -1: a leaf with a zero-length axis has no size to infer from.
  return x.reshape(x.shape[:-1] + (num_blocks(length, block), block))


def _unblocked(x, length):
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))[..., :length]


def quantize(x, key=None, block: int = INT8_BLOCK) -> Int8Blocks:
  """`x` (at least one axis) as :class:`Int8Blocks`: rounded stochastically with the bits
  of `key` (unbiased: ``E[dequantize(quantize(x, key))] = x``), or to nearest without."""
  x = jnp.asarray(x, jnp.float32)
  blocks = _blocked(x, block)
  # One pass over the buffer for the scales: max propagates NaN, and ±inf is its own absmax.
  # (`initial` gives an empty block, of a zero-length axis, the absmax of an all-zero one.)
  absmax = jnp.max(jnp.abs(blocks), axis=-1, initial=0.0)
  bad = ~jnp.isfinite(absmax)
  # x / (absmax / 127): XLA divides by multiplying with the reciprocal and flushes
  # subnormals, so the divisor is the step (whose reciprocal stays normal up to float32's
  # largest absmax), and a block whose step is not a normal number is flushed to zero.
  step = absmax / INT8_MAX
  flushed = step < jnp.finfo(jnp.float32).tiny
  scale = jnp.where(bad, jnp.nan, jnp.where(flushed, 0.0, absmax))
  divisor = jnp.where(bad | flushed, 1.0, step)[..., None]
  y = blocks / divisor  # garbage only in blocks whose codes are set to 0 below
  if key is None:
    y = jnp.round(y)
  else:
    # floor(y + u), u ~ U[0, 1): rounds up with probability equal to the fraction of y.
    y = jnp.floor(y + _blocked(dither(key, x.shape), block))
  codes = jnp.where((bad | flushed)[..., None], 0.0, jnp.clip(y, -INT8_MAX, INT8_MAX))
  codes = codes.astype(jnp.int8)
  return Int8Blocks(_unblocked(codes, x.shape[-1]), scale, block)


def dither(key, shape) -> jax.Array:
  """Uniform numbers in ``[0, 1)`` on a grid of ``2**-24`` for stochastic rounding: a
  32-bit integer hash (Wellons' ``lowbias32``) of each entry's index, keyed by two words
  drawn from `key`.

  Elementwise, so XLA fuses it into the quantization: ``jax.random.uniform`` of the buffer's
  shape is a separate threefry kernel (a rolled loop on CPU) that writes and reads a float32
  array as large as the buffer, and it made the int8 step move more bytes than the float32 one
  (``benchmarks/cost_model.py``). A function of the global index only, so every sharding
  gets the same numbers. Rounding needs them uniform and fresh for each step, not
  cryptographic: each step's key gives new words.
  """
  words = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  h = _lowbias32(index ^ words[0])
  h = _lowbias32(h + words[1])
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _lowbias32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dequantize(stored: Int8Blocks, dtype=jnp.float32) -> jax.Array:
  """The float array an :class:`Int8Blocks` stands for (``q · scale / 127``)."""
  length = stored.q.shape[-1]
  step = (stored.scale / INT8_MAX)[..., None]  # divided first: 127 * scale may overflow
  values = _blocked(stored.q.astype(jnp.float32), stored.block) * step
  return _unblocked(values, length).astype(dtype)


def storage_zeros(shape, dtype):
  """A zero buffer of `shape` stored in `dtype` (an :class:`Int8Blocks` for int8)."""
  if jnp.dtype(dtype) == jnp.int8:
    return Int8Blocks.zeros(shape)
  return jnp.zeros(shape, dtype)


# ----------------------------------------------------------------------------- build and check


def init(params, options: _options.Compression, extra_spec=(), *, plain_dtype=None,
         key_data=None):
  """The buffers of zero for `params`. Plain (uncompressed) leaves are stored in
  ``plain_dtype(leaf)`` if given, else in ``options.plain_storage_dtype``; int8 applies to real
  floating leaves with at least one axis only (the others keep float32; complex leaves a
  complex buffer).

  A method that starts from a random state (``sketch="factors"``) draws it from the leaf's
  key of cycle 0 under `key_data` (the transform's base key; int8 storage rounds it to
  nearest); without `key_data` (shapes only, e.g. under ``jax.eval_shape``) its buffers are
  zeros."""
  sketch = _sketches.make_sketch(options)
  layouts = _layout.plan_tree(params, rank=options.rank, mask=options.mask, axes=options.axes,
                              side=options.side, fits=sketch.fits)
  spec = options.static() + tuple(extra_spec)

  def make(leaf, layout):
    if layout is None:
      dtype = jnp.dtype(plain_dtype(leaf) if plain_dtype else options.plain_storage_dtype)
      real_float = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
      if dtype == jnp.int8 and not (real_float and jnp.ndim(leaf)):
        dtype = jnp.dtype(jnp.float32)
      if jnp.iscomplexobj(leaf):
        dtype = jnp.promote_types(dtype, jnp.result_type(leaf))
      return storage_zeros(jnp.shape(leaf), dtype)
    if key_data is None:
      parts = {name: storage_zeros(shape, options.dtype)
               for name, shape in sketch.buffer_shapes(layout).items()}
    else:
      key = _options.leaf_key(key_data, options.prng_impl, np.uint32(layout.key_id), 0)
      parts = {name: quantize(x) if options.dtype == jnp.int8 else x.astype(options.dtype)
               for name, x in sketch.initial(key, layout).items()}
    return Compressed(parts, layout, sketch, spec)

  flat, treedef = _layout.flatten(params)
  return jax.tree.unflatten(treedef, [make(x, lay) for (_, x), lay in zip(flat, layouts)])


# The options that decide what a stored buffer means (the others, such as ``precision`` or a
# momentum's ``transfer``, change how it is computed, and may change between runs).
STORED_OPTIONS = ("rank", "sketch", "projection", "side", "dtype", "plain_dtype", "prng_impl",
                  "transform")


def check(updates, buffers, what: str, options: _options.Compression | None = None,
          extra_spec=()) -> None:
  """Raises an error naming the leaf when `updates` does not fit the buffers of a state, or
  (given the transform's `options` and `extra_spec`, as passed to :func:`init`) when a
  compressed buffer was made under other options: storage is read from the state, so a state
  of ``dtype="int8"`` handed to a float32 transform would otherwise go on in int8 unnoticed."""
  wanted = None if options is None else dict(options.static() + tuple(extra_spec))
  up_def = jax.tree.structure(updates)
  buf_def = jax.tree.structure(buffers, is_leaf=_is_node)
  if up_def != buf_def:
    raise ValueError(f"the update tree does not match the {what} state: the state was built "
                     f"for {buf_def.num_leaves} leaves with structure {buf_def}, the updates "
                     f"have {_layout.describe(updates)}")
  for name, g, buf in zip(_layout.leaf_names(updates), jax.tree.leaves(updates),
                          nodes(buffers)):
    want = buf.leaf.shape if is_compressed(buf) else tuple(buf.shape)
    if tuple(jnp.shape(g)) != want:
      hint = (f" (compressed as {buf.leaf.n}x{buf.leaf.m} at rank {buf.leaf.rank})"
              if is_compressed(buf) else "")
      raise ValueError(f"the update for {name} has shape {tuple(jnp.shape(g))}, but the {what} "
                       f"state was built for shape {want}{hint}; was the state made for other "
                       f"parameters?")
    if wanted is None or not is_compressed(buf):
      continue
    saved = dict(buf.spec)
    differ = [k for k in STORED_OPTIONS if saved.get(k) != wanted.get(k)]
    if differ:
      raise ValueError(
          f"the {what} state's buffer for {name} {want} was built with "
          + ", ".join(f"{k}={saved.get(k)!r}" for k in differ) + ", and this transform uses "
          + ", ".join(f"{k}={wanted.get(k)!r}" for k in differ) + "; build the transform "
          f"with the state's options to continue it, or start from a fresh init")


# ----------------------------------------------------------------------------- random draws


def draw(buffers, key_data, cycle, prng_impl: str):
  """The random matrices of every compressed leaf for `cycle` (a marker for plain leaves).

  Each leaf draws its own, from its own key (``projections`` regenerates the same numbers; a
  test compares them bit for bit). Release 0.1.0 drew same-shape leaves together under one
  ``vmap`` and sliced the stack; XLA then fused the whole random-number kernel into every
  slice, and the compiled GPT-2-small update at rank 256 counted 21.6 GFLOP and 7.9 GB more
  than drawing each leaf once (``benchmarks/cost_model.py``; docs/benchmarks.md).
  """
  def one(node):
    if not is_compressed(node):
      return _NoDraw()
    key = _options.leaf_key(key_data, prng_impl, np.uint32(node.leaf.key_id), cycle)
    return _Draws(node.sketch.draw(key, node.leaf))
  return map_leaves(one, buffers)


@dataclasses.dataclass(frozen=True)
class _Draws:
  """Draws of one leaf, kept opaque to tree maps over the buffers (a leaf, not a node)."""

  arrays: dict


class _NoDraw:
  """Marks a plain leaf in a tree of draws."""


# ----------------------------------------------------------------------------- linear maps


class Scaled(NamedTuple):
  """A compressed leaf's update given as ``diag(rows) · x · diag(cols)`` (matrix view; a
  ``None`` scale is all ones), compressed without forming the product."""

  x: jax.Array
  rows: jax.Array | None
  cols: jax.Array | None


def compress(buffers, updates, draws, compute_dtype, scaled=None):
  """Each update leaf in its buffer's form: compressed, or cast to the compute dtype.

  `scaled`, if given, is a tree like the buffers holding a :class:`Scaled` for some
  compressed leaves (``None`` elsewhere); those leaves are compressed from it, and their
  entry in `updates` is not read (so XLA drops what only computed it)."""
  if scaled is None:
    scaled = map_leaves(lambda _: None, buffers)

  def one(buf, g, d, s):
    if is_compressed(buf):
      x, scale = (g, None) if s is None else (s.x, (s.rows, s.cols))
      return dataclasses.replace(buf, parts=buf.sketch.compress(x, d.arrays, buf.leaf, scale))
    return g.astype(jnp.promote_types(compute_dtype, g.dtype))
  return map_leaves(one, buffers, updates, draws, scaled)


def fold(buffers, updates, draws, compute_dtype, *, mix, rate, scaled=None):
  """Each buffer with its update folded in, ``(1 - rate)·old + rate·new``.

  Plain leaves and linear sketches combine entry-wise by ``mix(old, new)``, the transform's
  exact arithmetic (an EMA, Welford's mean), on compressed updates; a method that is not
  linear folds at `rate` itself (:meth:`_sketches.Sketch.fold`). `scaled` as in
  :func:`compress`."""
  if scaled is None:
    scaled = map_leaves(lambda _: None, buffers)

  def one(buf, g, d, s):
    if is_compressed(buf):
      x, scale = (g, None) if s is None else (s.x, (s.rows, s.cols))
      return dataclasses.replace(
          buf, parts=buf.sketch.fold(buf.parts, x, d.arrays, buf.leaf, mix, rate, scale))
    return mix(buf, g.astype(jnp.promote_types(compute_dtype, g.dtype)))
  return map_leaves(one, buffers, updates, draws, scaled)


def decompress(buffers, draws, residual=None, residual_scale=1.0):
  """Every buffer at full size; with a `residual` tree, plus ``residual_scale`` times its part
  outside the subspace (a :class:`Scaled` residual leaf stands for its scaled matrix)."""
  if residual is None:
    residual = map_leaves(lambda _: None, buffers)

  def one(buf, d, r):
    if is_compressed(buf):
      if isinstance(r, Scaled):   # diag(rows) x diag(cols), for a sketch that scales cheaply
        return buf.sketch.decompress(buf.parts, d.arrays, buf.leaf, r.x, residual_scale,
                                     scale=(r.rows, r.cols))
      return buf.sketch.decompress(buf.parts, d.arrays, buf.leaf, r, residual_scale)
    return buf
  return jax.tree.map(one, buffers, draws, residual,
                      is_leaf=lambda x: is_compressed(x) or x is None or isinstance(x, Scaled))


def transfer(buffers, old, new, how):
  """Every compressed buffer moved from the `old` draws to the `new` ones. `how(leaf)`
  returns the transfer kind of a leaf (a string, or a traced bool for per-leaf choices)."""
  def one(buf, d_old, d_new):
    if not is_compressed(buf):
      return buf
    parts = buf.sketch.transfer(buf.parts, d_old.arrays, d_new.arrays, buf.leaf, how(buf.leaf))
    return dataclasses.replace(buf, parts=parts)
  return map_leaves(one, buffers, old, new)


def to_compute(buffers, compute_dtype):
  """Stored buffers as compute arrays (bfloat16 storage is widened to float32, int8 blocks
  are dequantized to float32)."""
  def one(x):
    if is_int8(x):
      return dequantize(x, jnp.promote_types(compute_dtype, jnp.float32))
    return x.astype(jnp.promote_types(compute_dtype, x.dtype))
  return jax.tree.map(one, buffers, is_leaf=is_int8)


def reset(buffers):
  """The buffers of zero, following `buffers` (a method may keep what is not the value: the
  factors keep ``A``, the subspace of the last mean, as a warm start)."""
  return map_leaves(lambda buf: dataclasses.replace(buf, parts=buf.sketch.reset(buf.parts))
                    if is_compressed(buf) else jnp.zeros_like(buf), buffers)


# ----------------------------------------------------------------------------- storage


def store(values, like, key_data, prng_impl: str, *steps):
  """`values` cast to the dtypes of the buffers `like` (int8: :func:`quantize`).

  bfloat16 and int8 storage round stochastically (unbiased: ``E[store(x)] = x``):
  round-to-nearest drops every EMA increment below half a step, and a bf16 EMA with decay
  0.9 settled 3.9% short of its target that way (``tests/test_momentum.py`` measures both;
  ``tests/test_int8.py`` the int8 one). The bits come from the transform's key folded with a
  rounding tag, the array's path in the buffer tree and the `steps` counters, so they never
  coincide with a projection's.
  """
  def one(path, x, ref):
    if is_int8(ref):
      key = _options.rounding_key(key_data, prng_impl, jax.tree_util.keystr(path), steps)
      return quantize(x, key, ref.block)
    if x.dtype == ref.dtype:
      return x
    if ref.dtype != jnp.bfloat16 or x.dtype != jnp.float32:
      return x.astype(ref.dtype)
    key = _options.rounding_key(key_data, prng_impl, jax.tree_util.keystr(path), steps)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # bfloat16 keeps the top 16 bits of a float32: uniform noise added below them before
    # truncation rounds up with probability equal to the dropped fraction.
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = jnp.where(jnp.isfinite(x), (bits + noise) & jnp.uint32(0xFFFF0000), bits)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jax.tree_util.tree_map_with_path(one, values, like)


def any_compressed(buffers) -> bool:
  return any(is_compressed(x) for x in nodes(buffers))
