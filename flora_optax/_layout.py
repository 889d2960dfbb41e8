"""The layout of a tree: which leaves are compressed, as which matrices, and what their keys are.

A leaf is viewed as a batch of matrices ``(*batch, n, m)`` (see :class:`MatrixAxes`). Planning
is static (shapes only) and happens once, in ``init``; the result travels inside the state as
static metadata of each compressed buffer, so ``update``, ``memory_report`` and
``state_shardings`` read it instead of re-deriving it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MatrixAxes(NamedTuple):
  """How a leaf with any number of axes is viewed as a (batch of) matrices.

  The leaf is transposed to ``(*batch, *rows, *cols)`` and reshaped to
  ``(*batch_shape, prod(rows), prod(cols))``. Every axis must appear exactly once.
  Negative axes count from the end.

  Examples:
    * a dense kernel ``(in, out)``: ``MatrixAxes(rows=0, cols=1)`` (the default for 2-D);
    * a conv kernel ``(h, w, in, out)``: ``MatrixAxes(rows=(0, 1, 2), cols=3)``
      (the default for leaves with more than two axes: all but the last are rows);
    * a scanned stack of layers ``(layers, n, m)``: ``MatrixAxes(rows=1, cols=2,
      batch=0)``: one matrix per layer, each with its own projection;
    * a ``DenseGeneral`` query kernel ``(embed, heads, head_dim)``:
      ``MatrixAxes(rows=0, cols=(1, 2))``.
  """

  rows: int | Sequence[int] = 0
  cols: int | Sequence[int] = 1
  batch: int | Sequence[int] = ()


def path_name(path) -> str:
  """``params['dense']['kernel']`` style name of a leaf path."""
  return "params" + jax.tree_util.keystr(tuple(path))


def key_id(name: str) -> int:
  """A stable 31-bit id of a leaf name, folded into its PRNG keys.

  It depends on the leaf's path only (not on its position in the tree), so adding or
  removing a parameter leaves every other leaf's projections unchanged. CRC-32 is stable
  across processes and Python versions (``hash`` is salted per process). The top bit is
  cleared so that no id equals the tags folded in for other purposes (see ``_keys``).
  """
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """Static description of one compressed leaf: its matrix view, compressed side and rank."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  batch_axes: tuple[int, ...]
  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]
  side: str
  rank: int

  @property
  def perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.row_axes + self.col_axes

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.row_axes)

  @property
  def m(self) -> int:
    return math.prod(self.shape[a] for a in self.col_axes)

  @property
  def key_id(self) -> int:
    return key_id(self.name)

  @property
  def dim(self) -> int:
    """Size of the side a one-sided projection compresses."""
    return self.m if self.side == "cols" else self.n

  def to_matrix(self, x: jax.Array) -> jax.Array:
    if self.perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, self.perm)
    return x.reshape(self.batch_shape + (self.n, self.m))

  def from_matrix(self, x: jax.Array) -> jax.Array:
    x = x.reshape(tuple(self.shape[a] for a in self.perm))
    if self.perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, tuple(int(a) for a in np.argsort(self.perm)))
    return x


def _as_axes(value, label, name, shape) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (value,)
  try:
    axes = tuple(value)
  except TypeError:
    raise TypeError(f"MatrixAxes {label}={value!r} for {name} {shape} must be an int or a "
                    f"sequence of ints") from None
  ndim = len(shape)
  for a in axes:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool) or not -ndim <= a < ndim:
      raise ValueError(f"MatrixAxes {label} axis {a!r} for {name} {shape} is not an axis of a "
                       f"{ndim}-d leaf")
  return tuple(int(a) % ndim for a in axes)


def matrix_view(name: str, shape: tuple[int, ...], axes: MatrixAxes | None):
  """Returns the (batch, rows, cols) axis groups of a leaf of `shape`, or raises naming it."""
  ndim = len(shape)
  if axes is None:
    axes = MatrixAxes(rows=tuple(range(ndim - 1)), cols=ndim - 1)
  if not isinstance(axes, MatrixAxes):
    raise TypeError(f"axes for {name} {shape} must be a flora_optax.MatrixAxes or None, got "
                    f"{axes!r}")
  batch, rows, cols = (_as_axes(getattr(axes, label), label, name, shape)
                       for label in ("batch", "rows", "cols"))
  if not rows or not cols:
    raise ValueError(f"axes {axes} for {name} {shape}: rows and cols must each name at least "
                     f"one axis")
  if sorted(batch + rows + cols) != list(range(ndim)):
    raise ValueError(f"axes {axes} do not cover {name} {shape}: every one of its {ndim} axes "
                     f"must appear exactly once in batch, rows or cols (got "
                     f"{batch + rows + cols})")
  return batch, rows, cols


def broadcast_option(option, tree, label: str, is_leaf=None) -> list:
  """A per-leaf option (None, a value, a prefix tree or a callable) as a list over leaves."""
  if callable(option) and not isinstance(option, MatrixAxes):
    option = option(tree)
  leaf_like = lambda x: x is None or (is_leaf is not None and is_leaf(x))  # noqa: E731
  if leaf_like(option):
    return [option] * jax.tree.structure(tree).num_leaves
  try:
    broadcast = jax.tree.map(lambda opt, sub: jax.tree.map(lambda _: opt, sub), option, tree,
                             is_leaf=leaf_like)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{label} must be a pytree prefix of the parameters (or a callable "
                     f"returning one); it does not match: {e}") from e
  return jax.tree.leaves(broadcast, is_leaf=leaf_like)


def plan_tree(tree, *, rank: int, mask, axes, side: str, fits) -> list[LeafLayout | None]:
  """The layout of every leaf of `tree` (``None``: not compressed), in ``jax.tree.leaves`` order.

  ``fits(n, m, side) -> (ok, why)`` is the compression method's test that a compressed
  buffer of `rank` is smaller than the leaf. A leaf the mask explicitly asks to compress but
  that cannot be raises an error naming it; by default such leaves stay uncompressed.
  """
  masks = broadcast_option(mask, tree, "mask")
  leaf_axes = broadcast_option(axes, tree, "axes", is_leaf=lambda x: isinstance(x, MatrixAxes))
  return [_plan_leaf(name, leaf, want, view, rank, side, fits)
          for (name, leaf), want, view in zip(flatten(tree)[0], masks, leaf_axes)]


def _plan_leaf(name, leaf, want, view, rank, side, fits) -> LeafLayout | None:
  shape = tuple(jnp.shape(leaf))
  if want is not None and not isinstance(want, (bool, np.bool_)):
    raise TypeError(f"mask for {name} {shape} must be a bool or None, got {want!r}")
  if want is not None and not want:
    return None
  explicit = want is not None

  def refuse(reason):
    if explicit:
      raise ValueError(f"mask asks to compress {name} {shape}, but {reason}")
    return None

  dtype = jnp.result_type(leaf) if hasattr(leaf, "dtype") else jnp.result_type(float)
  if len(shape) < 2:
    return refuse(f"it has {len(shape)} axes; only leaves with at least 2 axes can be")
  if not jnp.issubdtype(dtype, jnp.floating):
    return refuse(f"its dtype is {dtype}; only real floating-point leaves can be (complex "
                  f"leaves keep a full complex buffer)")
  batch, rows, cols = matrix_view(name, shape, view)
  n, m = math.prod(shape[a] for a in rows), math.prod(shape[a] for a in cols)
  chosen = {"smaller": "rows" if n < m else "cols",
            "larger": "cols" if n < m else "rows"}.get(side, side)
  ok, why = fits(n, m, chosen)
  if not ok:
    return refuse(f"rank={rank} does not compress its {n}x{m} matrix view: {why}; lower the "
                  f"rank or mask the leaf out")
  return LeafLayout(name, shape, str(dtype), batch, rows, cols, chosen, rank)


def _is_boxed(x) -> bool:
  """A box around one array (``flax.nnx.Variable``), seen through rather than into."""
  return hasattr(x, "get_value") and not isinstance(x, (jax.Array, np.ndarray))


def flatten(tree) -> tuple[list[tuple[str, Any]], Any]:
  """``(name, array)`` per leaf and the treedef, seeing through ``nnx.Variable`` boxes.

  Buffers are built on the unboxed structure: ``nnx.Optimizer`` passes boxed parameters to
  ``init`` and unboxed ones to ``update``, and a compressed buffer must not sit inside a box
  (nnx would store its value and lose its static layout).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_boxed)
  return [(path_name(path), x.get_value() if _is_boxed(x) else x) for path, x in leaves], treedef


def map_unboxed(fn, tree):
  """``jax.tree.map(fn, tree)`` on the arrays inside any ``nnx.Variable`` boxes, returning an
  unboxed tree (so that a per-leaf pytree result never ends up inside a box)."""
  flat, treedef = flatten(tree)
  return jax.tree.unflatten(treedef, [fn(x) for _, x in flat])


def unbox(tree):
  """`tree` without ``nnx.Variable`` boxes, and a function that puts a result with that
  unboxed structure back into `tree`'s own (boxes, if any, included)."""
  flat, treedef = flatten(tree)
  plain = jax.tree.unflatten(treedef, [x for _, x in flat])
  if all(not _is_boxed(x) for x in jax.tree.leaves(tree, is_leaf=_is_boxed)):
    return plain, lambda result: result
  outer = jax.tree.structure(tree)
  return plain, lambda result: jax.tree.unflatten(outer, jax.tree.leaves(result))


def leaf_names(tree) -> list[str]:
  return [name for name, _ in flatten(tree)[0]]


def describe(tree: Any) -> str:
  return f"{jax.tree.structure(tree).num_leaves} leaves with structure {jax.tree.structure(tree)}"
