"""Trees of compressed buffers: the one pipeline every Flora transform is written against.

A buffer tree has the structure of the parameters. A compressed leaf is a :class:`Compressed`
node: its arrays (``parts``) are pytree children; its layout and the options that shaped it
are static metadata, so a state carries its own plan through ``jit``, checkpoints and
``jax.eval_shape``, and ``update`` never re-plans from the updates it is given. Leaves that
are not compressed are plain arrays with exactly ``optax``'s arithmetic.

The transforms use whole-tree operations only: :func:`init`, :func:`check`,
:func:`draw`, :func:`fold` (or :func:`compress` for a linear accumulation), :func:`decompress`,
:func:`transfer`, :func:`reset`, :func:`to_compute`, :func:`store`.
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
      the two-sided sketch.
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


def map_leaves(fn, buffers, *rest):
  """``jax.tree.map`` over a buffer tree, a :class:`Compressed` node counting as one leaf."""
  return jax.tree.map(fn, buffers, *rest, is_leaf=is_compressed)


def nodes(buffers) -> list:
  return jax.tree.leaves(buffers, is_leaf=is_compressed)


# ----------------------------------------------------------------------------- build and check


def init(params, options: _options.Compression, extra_spec=(), *, plain_dtype=None,
         key_data=None):
  """The buffers of zero for `params`. Plain (uncompressed) leaves are stored in
  ``plain_dtype`` if given, else the storage dtype (complex leaves keep a complex buffer).

  A method that starts from a random state (``sketch="factors"``) draws it from the leaf's
  key of cycle 0 under `key_data` (the transform's base key); without `key_data` (shapes
  only, e.g. under ``jax.eval_shape``) its buffers are zeros."""
  sketch = _sketches.make_sketch(options)
  layouts = _layout.plan_tree(params, rank=options.rank, mask=options.mask, axes=options.axes,
                              side=options.side, fits=sketch.fits)
  spec = options.static() + tuple(extra_spec)

  def make(leaf, layout):
    if layout is None:
      dtype = plain_dtype(leaf) if plain_dtype else options.dtype
      if jnp.iscomplexobj(leaf):
        dtype = jnp.promote_types(dtype, jnp.result_type(leaf))
      return jnp.zeros(jnp.shape(leaf), dtype)
    if key_data is None:
      parts = {name: jnp.zeros(shape, options.dtype)
               for name, shape in sketch.buffer_shapes(layout).items()}
    else:
      key = _options.leaf_key(key_data, options.prng_impl, np.uint32(layout.key_id), 0)
      parts = {name: x.astype(options.dtype) for name, x in sketch.initial(key, layout).items()}
    return Compressed(parts, layout, sketch, spec)

  flat, treedef = _layout.flatten(params)
  return jax.tree.unflatten(treedef, [make(x, lay) for (_, x), lay in zip(flat, layouts)])


def check(updates, buffers, what: str) -> None:
  """Raises an error naming the leaf when `updates` does not fit the buffers of a state."""
  up_def = jax.tree.structure(updates)
  buf_def = jax.tree.structure(buffers, is_leaf=is_compressed)
  if up_def != buf_def:
    raise ValueError(f"the update tree does not match the {what} state: the state was built "
                     f"for {buf_def.num_leaves} leaves with structure {buf_def}, the updates "
                     f"have {_layout.describe(updates)}")
  for name, g, buf in zip(_layout.leaf_names(updates), jax.tree.leaves(updates),
                          nodes(buffers)):
    want = buf.leaf.shape if is_compressed(buf) else tuple(jnp.shape(buf))
    if tuple(jnp.shape(g)) != want:
      hint = (f" (compressed as {buf.leaf.n}x{buf.leaf.m} at rank {buf.leaf.rank})"
              if is_compressed(buf) else "")
      raise ValueError(f"the update for {name} has shape {tuple(jnp.shape(g))}, but the {what} "
                       f"state was built for shape {want}{hint}; was the state made for other "
                       f"parameters?")


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


def decompress(buffers, draws, residual=None):
  """Every buffer at full size; with a `residual` tree, plus its part outside the subspace."""
  if residual is None:
    residual = map_leaves(lambda _: None, buffers)

  def one(buf, d, r):
    if is_compressed(buf):
      return buf.sketch.decompress(buf.parts, d.arrays, buf.leaf, r)
    return buf
  return jax.tree.map(one, buffers, draws, residual,
                      is_leaf=lambda x: is_compressed(x) or x is None)


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
  """Stored buffers as compute arrays (bfloat16 storage is widened to float32)."""
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(compute_dtype, x.dtype)), buffers)


def reset(buffers):
  """The buffers of zero, following `buffers` (a method may keep what is not the value: the
  factors keep ``A``, the subspace of the last mean, as a warm start)."""
  return map_leaves(lambda buf: dataclasses.replace(buf, parts=buf.sketch.reset(buf.parts))
                    if is_compressed(buf) else jnp.zeros_like(buf), buffers)


# ----------------------------------------------------------------------------- storage


def store(values, like, key_data, prng_impl: str, *steps):
  """`values` cast to the dtypes of the buffers `like`.

  bfloat16 storage rounds stochastically (unbiased: ``E[store(x)] = x``): round-to-nearest
  drops every EMA increment below half a bfloat16 ulp, and a bf16 EMA with decay 0.9 settled
  3.9% short of its target that way (``tests/test_momentum.py`` measures both). The bits
  come from the transform's key folded with a rounding tag, the array's path in the buffer
  tree and the `steps` counters, so they never coincide with a projection's.
  """
  def one(path, x, ref):
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
