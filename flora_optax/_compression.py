"""Random-projection compression of pytree leaves, shared by every Flora transform.

A leaf is viewed as a batch of matrices ``(*batch, n, m)`` (see :class:`MatrixAxes`). One
side of each matrix, of size ``d`` (``n`` or ``m``), is compressed to ``rank`` by a random
projection ``A`` of shape ``(*batch, rank, d)`` with ``E[AᵀA] = I``:

* side ``"cols"``: ``C = X Aᵀ`` of shape ``(*batch, n, rank)``, and back ``X̂ = C A``;
* side ``"rows"``: ``C = A X`` of shape ``(*batch, rank, m)``, and back ``X̂ = Aᵀ C``.

``A`` is never stored: it is regenerated from a base PRNG key folded with a domain tag (so
momentum and accumulation never share projections), the leaf's index in the flattened tree,
and a cycle number. With threefry keys and ``jax_threefry_partitionable`` (JAX's default) the
numbers are the same however the computation is sharded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PROJECTIONS = ("gaussian", "orthogonal", "rademacher")
SIDES = ("smaller", "larger", "rows", "cols")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# Domain tags folded into the base key so that two transforms built with the same seed
# (say flora_momentum and flora_accumulate in one chain) never draw the same projection.
DOMAIN_MOMENTUM = 1
DOMAIN_ACCUMULATE = 2
DOMAIN_MICROBATCH = 3
# Folded into a transform's key in place of a leaf index to draw stochastic-rounding bits.
_ROUNDING_TAG = 2**32 - 1


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


def path_str(path) -> str:
  """``params['dense']['kernel']`` style name of a leaf path."""
  return "params" + jax.tree_util.keystr(tuple(path))


def _as_tuple(axes) -> tuple[int, ...]:
  if isinstance(axes, (int,)) and not isinstance(axes, bool):
    return (axes,)
  return tuple(axes)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static description of how one leaf is stored (computed from its shape at trace time)."""

  name: str
  index: int
  shape: tuple[int, ...]
  compressed: bool
  perm: tuple[int, ...] = ()
  batch_shape: tuple[int, ...] = ()
  n: int = 0
  m: int = 0
  side: str = "cols"
  rank: int = 0

  @property
  def dim(self) -> int:
    """Size of the compressed dimension."""
    return self.m if self.side == "cols" else self.n

  @property
  def state_shape(self) -> tuple[int, ...]:
    if not self.compressed:
      return self.shape
    if self.side == "cols":
      return self.batch_shape + (self.n, self.rank)
    return self.batch_shape + (self.rank, self.m)

  @property
  def projection_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.rank, self.dim)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    if self.perm != tuple(range(len(self.shape))):
      x = jnp.transpose(x, self.perm)
    return x.reshape(self.batch_shape + (self.n, self.m))

  def from_matrix(self, x: jax.Array) -> jax.Array:
    permuted_shape = tuple(self.shape[a] for a in self.perm)
    x = x.reshape(permuted_shape)
    if self.perm != tuple(range(len(self.shape))):
      inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
      x = jnp.transpose(x, inverse)
    return x


def _matrix_view(name, shape, axes: MatrixAxes | None):
  """Returns (perm, batch_shape, n, m) for a leaf of `shape`, or raises naming the leaf."""
  ndim = len(shape)
  if axes is None:
    if ndim == 2:
      axes = MatrixAxes(rows=0, cols=1)
    else:
      axes = MatrixAxes(rows=tuple(range(ndim - 1)), cols=ndim - 1)
  if not isinstance(axes, MatrixAxes):
    raise TypeError(
        f"axes for {name} {tuple(shape)} must be a flora_optax.MatrixAxes or None, got "
        f"{axes!r}"
    )
  groups = []
  for label in ("batch", "rows", "cols"):
    raw = _as_tuple(getattr(axes, label))
    normalized = []
    for a in raw:
      if not isinstance(a, int) or isinstance(a, bool) or not -ndim <= a < ndim:
        raise ValueError(
            f"axes {axes} for {name} {tuple(shape)}: {label} axis {a!r} is not an axis of "
            f"a {ndim}-d leaf"
        )
      normalized.append(a % ndim)
    groups.append(tuple(normalized))
  batch, rows, cols = groups
  if not rows or not cols:
    raise ValueError(
        f"axes {axes} for {name} {tuple(shape)}: rows and cols must each name at least one "
        f"axis"
    )
  flat = batch + rows + cols
  if sorted(flat) != list(range(ndim)):
    raise ValueError(
        f"axes {axes} do not cover {name} {tuple(shape)}: every one of its {ndim} axes must "
        f"appear exactly once in batch, rows or cols (got {flat})"
    )
  batch_shape = tuple(shape[a] for a in batch)
  n = math.prod(shape[a] for a in rows)
  m = math.prod(shape[a] for a in cols)
  return flat, batch_shape, n, m


def _choose_side(side: str, n: int, m: int) -> str:
  if side == "smaller":
    return "rows" if n < m else "cols"
  if side == "larger":
    return "cols" if n < m else "rows"
  return side


def check_rank(rank) -> int:
  """Returns `rank` as an int, or raises if it is not a positive static integer."""
  if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
    if rank < 1:
      raise ValueError(f"rank must be a positive int, got rank={rank}")
    return int(rank)
  if isinstance(rank, jax.Array):
    raise TypeError(
        f"rank must be a static Python int, got an array {rank!r}; with "
        f"optax.inject_hyperparams pass static_args=('rank', ...)")
  raise TypeError(f"rank must be a positive int, got rank={rank!r} ({type(rank).__name__})")


def _resolve_tree_option(option, tree, name, is_leaf=None):
  """Broadcasts a per-leaf option (None, a value, a prefix tree or a callable) to `tree`."""
  if callable(option) and not isinstance(option, MatrixAxes):
    option = option(tree)
  # None entries mean "the default for this leaf (or subtree)".
  leaf_like = lambda x: x is None or (is_leaf is not None and is_leaf(x))  # noqa: E731
  num_leaves = jax.tree.structure(tree).num_leaves
  if leaf_like(option):
    return [option] * num_leaves
  try:
    broadcast = jax.tree.map(
        lambda opt, sub: jax.tree.map(lambda _: opt, sub), option, tree, is_leaf=leaf_like)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name} must be a pytree prefix of the parameters (or a callable returning one); "
        f"it does not match: {e}") from e
  values = jax.tree.leaves(broadcast, is_leaf=leaf_like)
  assert len(values) == num_leaves
  return values


@dataclasses.dataclass(frozen=True)
class Compressor:
  """Everything static about how a tree is compressed; shared by all Flora transforms."""

  rank: int
  domain: int
  mask: Any = None
  axes: Any = None
  side: str = "smaller"
  projection: str = "gaussian"
  dtype: Any = jnp.float32
  precision: Any = None
  prng_impl: str = "threefry2x32"

  def __post_init__(self):
    object.__setattr__(self, "rank", check_rank(self.rank))
    if self.side not in SIDES:
      raise ValueError(f"side must be one of {SIDES}, got side={self.side!r}")
    if self.projection not in PROJECTIONS:
      raise ValueError(
          f"projection must be one of {PROJECTIONS}, got projection={self.projection!r}")
    if self.prng_impl not in PRNG_IMPLS:
      raise ValueError(f"prng_impl must be one of {PRNG_IMPLS}, got {self.prng_impl!r}")
    dtype = jnp.dtype(self.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"dtype must be a floating dtype, got dtype={self.dtype!r}")
    object.__setattr__(self, "dtype", dtype)

  @property
  def compute_dtype(self):
    """Projections and arithmetic run in at least float32, whatever the buffers are stored in."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def store(self, x: jax.Array, key_data, index: int, *steps) -> jax.Array:
    """Casts a buffer to its storage dtype.

    bfloat16 storage rounds stochastically (unbiased: ``E[store(x)] = x``). Round-to-nearest
    would drop every EMA increment below half a bfloat16 ulp of the stored value: a bf16 EMA
    with decay 0.9 settled 3.9% short of its target that way (tests/test_momentum.py measures
    both). The rounding bits come from the transform's own key, folded with a tag no leaf
    index reaches, the leaf index and the `steps` counters, so they never coincide with a
    projection's.
    """
    if x.dtype == self.dtype:
      return x
    if self.dtype != jnp.bfloat16 or x.dtype != jnp.float32:
      return x.astype(self.dtype)
    key = jax.random.wrap_key_data(key_data, impl=self.prng_impl)
    key = jax.random.fold_in(jax.random.fold_in(key, _ROUNDING_TAG), index)
    for step in steps:
      key = jax.random.fold_in(key, step)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # bfloat16 keeps the top 16 bits of a float32: adding uniform noise below them before
    # truncating rounds up with probability equal to the dropped fraction.
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    finite = jnp.isfinite(x)
    rounded = jnp.where(finite, (bits + noise) & jnp.uint32(0xFFFF0000), bits)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)

  # ---------------------------------------------------------------- plans (static)

  def plan(self, tree) -> list[LeafPlan]:
    """Per-leaf plans in `jax.tree.leaves` order. Raises on leaves that cannot be compressed."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    masks = _resolve_tree_option(self.mask, tree, "mask")
    axes = _resolve_tree_option(
        self.axes, tree, "axes", is_leaf=lambda x: isinstance(x, MatrixAxes))
    plans = []
    for index, ((path, leaf), want, leaf_axes) in enumerate(
        zip(leaves_with_path, masks, axes)):
      plans.append(self._plan_leaf(path_str(path), index, leaf, want, leaf_axes))
    return plans

  def _plan_leaf(self, name, index, leaf, want, leaf_axes) -> LeafPlan:
    shape = tuple(jnp.shape(leaf))
    dtype = jnp.result_type(leaf) if hasattr(leaf, "dtype") else None
    if want is not None and not isinstance(want, (bool,)) and not (
        hasattr(want, "dtype") and want.dtype == jnp.bool_ and jnp.ndim(want) == 0):
      raise TypeError(f"mask for {name} {shape} must be a bool, got {want!r}")
    explicit = want is not None and bool(want)
    if want is not None and not bool(want):
      return LeafPlan(name, index, shape, compressed=False)
    if len(shape) < 2:
      if explicit:
        raise ValueError(
            f"mask asks to compress {name} {shape}, which has {len(shape)} axes; only leaves "
            f"with at least 2 axes can be compressed")
      return LeafPlan(name, index, shape, compressed=False)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
      if explicit:
        raise TypeError(
            f"mask asks to compress {name} {shape} of dtype {dtype}; only floating-point "
            f"leaves can be compressed")
      return LeafPlan(name, index, shape, compressed=False)
    perm, batch_shape, n, m = _matrix_view(name, shape, leaf_axes)
    side = _choose_side(self.side, n, m)
    d = m if side == "cols" else n
    if self.rank >= d:
      if explicit:
        raise ValueError(
            f"rank={self.rank} is not smaller than dimension {d} of {name} {shape} "
            f"(compressed side {side!r} of its {n}x{m} matrix view); lower the rank or "
            f"mask the leaf out")
      return LeafPlan(name, index, shape, compressed=False)
    return LeafPlan(name, index, shape, compressed=True, perm=perm, batch_shape=batch_shape,
                    n=n, m=m, side=side, rank=self.rank)

  # ---------------------------------------------------------------- keys and projections

  def base_key_data(self, seed) -> jax.Array:
    """Raw key data (a few uint32 words) of the base key for `seed`, kept in the state."""
    if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
      raise TypeError(f"seed must be an int, got {seed!r}")
    key = jax.random.key(int(seed), impl=self.prng_impl)
    return jax.random.key_data(jax.random.fold_in(key, self.domain))

  def _leaf_key(self, key_data, index, cycle):
    key = jax.random.wrap_key_data(key_data, impl=self.prng_impl)
    return jax.random.fold_in(jax.random.fold_in(key, index), cycle)

  def projection_matrix(self, key_data, plan: LeafPlan, cycle) -> jax.Array:
    """The projection ``A`` (shape ``(*batch, rank, d)``) of one leaf for one cycle."""
    return make_projection(self._leaf_key(key_data, plan.index, cycle), plan.projection_shape,
                           self.projection, self.compute_dtype)

  def projection_matrices(self, key_data, plans: list[LeafPlan], cycle) -> list:
    """`projection_matrix` for every compressed leaf (None for the others).

    Leaves whose projections have the same shape are drawn together under one ``vmap`` (one
    random-number kernel, and one batched QR for ``orthogonal``, per shape instead of per
    leaf). Threefry is elementwise, so each matrix is bit-for-bit the one
    `projection_matrix` draws alone; a test checks it.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, plan in enumerate(plans):
      if plan.compressed:
        groups.setdefault(plan.projection_shape, []).append(position)
    out = [None] * len(plans)
    for shape, positions in groups.items():
      if len(positions) == 1:
        out[positions[0]] = self.projection_matrix(key_data, plans[positions[0]], cycle)
        continue
      indices = jnp.asarray([plans[i].index for i in positions], jnp.uint32)
      draw = lambda index, shape=shape: make_projection(  # noqa: E731
          self._leaf_key(key_data, index, cycle), shape, self.projection, self.compute_dtype)
      stacked = jax.vmap(draw)(indices)
      for j, position in enumerate(positions):
        out[position] = stacked[j]
    return out

  # ---------------------------------------------------------------- down / up

  def down(self, x: jax.Array, a: jax.Array, plan: LeafPlan) -> jax.Array:
    """Compress a full-size leaf `x` to its state shape with projection `a`."""
    x = plan.to_matrix(x)
    kw = dict(precision=self.precision, preferred_element_type=self.compute_dtype)
    if plan.side == "cols":
      return jnp.einsum("...nm,...rm->...nr", x, a, **kw)
    return jnp.einsum("...rn,...nm->...rm", a, x, **kw)

  def up(self, c: jax.Array, a: jax.Array, plan: LeafPlan) -> jax.Array:
    """Decompress a state-shaped leaf `c` to the leaf's shape with projection `a`."""
    kw = dict(precision=self.precision, preferred_element_type=self.compute_dtype)
    if plan.side == "cols":
      x = jnp.einsum("...nr,...rm->...nm", c, a, **kw)
    else:
      x = jnp.einsum("...rn,...rm->...nm", a, c, **kw)
    return plan.from_matrix(x)

  def right_multiply(self, c: jax.Array, t: jax.Array, plan: LeafPlan) -> jax.Array:
    """Applies an ``(r, r)`` change of basis `t` (``C' = C tᵀ`` or ``C' = t C``)."""
    kw = dict(precision=self.precision, preferred_element_type=self.compute_dtype)
    if plan.side == "cols":
      return jnp.einsum("...nr,...sr->...ns", c, t, **kw)
    return jnp.einsum("...sr,...rm->...sm", t, c, **kw)


def make_projection(key, shape, kind: str, dtype) -> jax.Array:
  """A random ``(*batch, r, d)`` matrix with ``E[AᵀA] = I`` for each batch entry.

  * ``gaussian``: i.i.d. ``N(0, 1/r)`` entries (the paper's choice).
  * ``rademacher``: i.i.d. ``±1/sqrt(r)`` entries; same expectation, cheaper to draw.
  * ``orthogonal``: ``sqrt(d/r)·Q`` with ``Q`` Haar-distributed orthonormal rows (QR of a
    Gaussian with the signs of ``R``'s diagonal fixed), so ``AᵀA = (d/r)·P`` exactly.
  """
  *batch, r, d = shape
  if kind == "gaussian":
    return jax.random.normal(key, shape, dtype) * jnp.asarray(1.0 / math.sqrt(r), dtype)
  if kind == "rademacher":
    return jax.random.rademacher(key, shape, dtype) * jnp.asarray(1.0 / math.sqrt(r), dtype)
  if kind == "orthogonal":
    g = jax.random.normal(key, (*batch, d, r), jnp.float32)
    q, upper = jnp.linalg.qr(g, mode="reduced")
    signs = jnp.sign(jnp.diagonal(upper, axis1=-2, axis2=-1))
    signs = jnp.where(signs == 0, 1.0, signs)
    q = q * signs[..., None, :]
    return (jnp.swapaxes(q, -1, -2) * math.sqrt(d / r)).astype(dtype)
  raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


def concrete_float(x) -> float | None:
  """`x` as a Python float if it is concrete, None if it is traced (inject_hyperparams)."""
  try:
    return float(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerIntegerConversionError):
    return None


def check_decay(decay, name="decay"):
  value = concrete_float(decay) if not callable(decay) else None
  if value is not None and not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {name}={value}")


def check_tree_matches(plans: list[LeafPlan], updates, state_tree, what: str):
  """Raises a clear error when `updates` does not match the tree the state was built for."""
  up_struct = jax.tree.structure(updates)
  st_struct = jax.tree.structure(state_tree)
  if up_struct.num_leaves != st_struct.num_leaves or up_struct != st_struct:
    raise ValueError(
        f"the update tree does not match the {what} state: the state was built for "
        f"{st_struct.num_leaves} leaves with structure {st_struct}, the updates have "
        f"{up_struct.num_leaves} leaves with structure {up_struct}")
  for plan, buffer in zip(plans, jax.tree.leaves(state_tree)):
    if tuple(jnp.shape(buffer)) != plan.state_shape:
      raise ValueError(
          f"the update for {plan.name} has shape {plan.shape}, which needs a {what} buffer of "
          f"shape {plan.state_shape}, but the state holds one of shape "
          f"{tuple(jnp.shape(buffer))}; was the state built for other parameters or other "
          f"options (rank, mask, axes, side)?")

