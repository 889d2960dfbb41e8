"""Looking inside Flora: regenerate projections, count optimizer-state bytes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from flora_optax import _buffers, _layout, _options

_DOMAINS = {"momentum": _options.DOMAIN_MOMENTUM, "accumulate": _options.DOMAIN_ACCUMULATE,
            "microbatch": _options.DOMAIN_MICROBATCH}
# Which defaults each transform takes (`_options.DEFAULT_SKETCH`).
_ROLES = {"momentum": "momentum", "accumulate": "accumulation", "microbatch": "accumulation"}


def projections(
    params: Any,
    rank: int,
    cycle: jax.typing.ArrayLike,
    seed: int = 0,
    *,
    transform: str = "momentum",
    **compression,
) -> Any:
  """Regenerates the random matrices a Flora transform uses in a given cycle.

  The cycle of :func:`flora_momentum` is its state's ``cycle`` (before the update: it moves
  to ``cycle + 1`` on the step that resamples); that of :func:`flora_accumulate` is its
  state's ``gradient_step``; that of :func:`compressed_mean` is its ``cycle`` argument.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    rank, seed, **compression: the options the transform was built with.
    cycle: the cycle number.
    transform: ``"momentum"``, ``"accumulate"`` or ``"microbatch"``.

  Returns:
    A tree like ``params`` holding, for each compressed leaf, a dict of its random matrices
    (``{"a": A}`` with ``A`` of shape ``(*batch, rank, d)`` for the projection;
    ``{"omega": Ω, "psi": Ψ}`` for the two-sided sketch), and ``None`` for the others. Each
    is drawn alone from its leaf's key, with no batching.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> draws = flora_optax.projections({"w": jnp.ones((64, 32))}, rank=8, cycle=0)
    >>> w = draws["w"]
    >>> w["a"].shape
    (8, 32)
  """
  _options.check_choice(transform, tuple(_DOMAINS), "transform")
  options = _options.compression_from(compression, rank, _ROLES[transform])
  if not isinstance(cycle, jax.core.Tracer):
    value = np.asarray(cycle)
    if (value.ndim or not np.issubdtype(value.dtype, np.integer) or isinstance(cycle, bool)
        or not 0 <= int(value) < 2**32):
      raise ValueError(f"cycle must be an integer in [0, 2**32), got cycle={cycle!r}")
  key_data = _options.base_key_data(seed, _DOMAINS[transform], options.prng_impl)
  buffers = jax.eval_shape(lambda: _buffers.init(params, options))

  def one(buf):
    if not _buffers.is_compressed(buf):
      return None
    key = _options.leaf_key(key_data, options.prng_impl, np.uint32(buf.leaf.key_id),
                            jax.numpy.asarray(cycle, jax.numpy.uint32))
    return buf.sketch.draw(key, buf.leaf)
  return jax.tree.unflatten(jax.tree.structure(params),
                            [one(b) for b in _buffers.nodes(buffers)])


def state_bytes(tree: Any) -> int:
  """Total bytes of the arrays (or ``jax.ShapeDtypeStruct``) in a tree.

  Use ``state_bytes(jax.eval_shape(tx.init, params))`` to size a state without building it.
  An int8 buffer counts its codes and its float32 block scales; a typed PRNG key array
  (``optax.add_noise`` keeps one) counts its key data.
  """
  def nbytes(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.eval_shape(jax.random.key_data, x)  # key<fry> has no NumPy itemsize
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return int(sum(nbytes(x) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  """One row of a :class:`MemoryReport`."""

  name: str
  shape: tuple[int, ...]
  compressed: bool
  buffer_shapes: dict[str, tuple[int, ...]]
  flora_bytes: int
  naive_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-leaf bytes of one Flora buffer against the naive full-size buffer.

  ``str(report)`` is a table; ``report.ratio`` is total Flora bytes over naive bytes.
  """

  rank: int
  leaves: tuple[LeafMemory, ...]

  @property
  def flora_bytes(self) -> int:
    return sum(leaf.flora_bytes for leaf in self.leaves)

  @property
  def naive_bytes(self) -> int:
    return sum(leaf.naive_bytes for leaf in self.leaves)

  @property
  def ratio(self) -> float:
    return self.flora_bytes / max(self.naive_bytes, 1)

  @property
  def num_compressed(self) -> int:
    return sum(leaf.compressed for leaf in self.leaves)

  def __str__(self) -> str:
    rows = [("leaf", "shape", "buffer", "flora", "naive")]
    for leaf in self.leaves:
      buffers = " + ".join("x".join(map(str, shape)) or "()"
                           for shape in leaf.buffer_shapes.values())
      rows.append((leaf.name, "x".join(map(str, leaf.shape)) or "()",
                   buffers + ("" if leaf.compressed else " (full)"),
                   _human(leaf.flora_bytes), _human(leaf.naive_bytes)))
    rows.append((f"total ({self.num_compressed}/{len(self.leaves)} compressed, rank "
                 f"{self.rank})", "", f"ratio {self.ratio:.3f}", _human(self.flora_bytes),
                 _human(self.naive_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError


def _naive_bytes(shape, dtype) -> int:
  if np.dtype(dtype) == np.int8 and len(shape):
    return state_bytes(jax.eval_shape(lambda: _buffers.storage_zeros(shape, dtype)))
  return math.prod(shape) * np.dtype(dtype).itemsize


def memory_report(params: Any, rank: int, *, transform: str = "momentum",
                  **compression) -> MemoryReport:
  """Bytes of one Flora buffer (momentum or accumulator) per leaf, against a naive one.

  The naive buffer is a full-size array of the storage ``dtype`` per leaf (what
  ``optax.ema`` or ``optax.MultiSteps`` keep; for ``dtype="int8"`` its codes and block
  scales, what :func:`flora_optax.int8_ema` keeps), complex for a complex leaf. Flora's bytes
  include the float32 block scales of int8 buffers. Each row shows the arrays a compressed leaf
  is stored in (one for the projection; the range and co-range sketches for
  ``sketch="two_sided"``). Counters and key data (a few bytes per transform) are not
  included; use :func:`state_bytes` on a real state for the exact total. ``transform``
  (``"momentum"``, ``"accumulate"`` or ``"microbatch"``) picks that transform's defaults.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> report = flora_optax.memory_report({"w": jnp.ones((512, 256))}, rank=32)
    >>> report.num_compressed, round(report.ratio, 3)
    (1, 0.125)
  """
  _options.check_choice(transform, tuple(_DOMAINS), "transform")
  options = _options.compression_from(compression, rank, _ROLES[transform])
  buffers = jax.eval_shape(lambda: _buffers.init(params, options))
  rows = []
  for name, leaf, buf in zip(_layout.leaf_names(params), jax.tree.leaves(params),
                             _buffers.nodes(buffers)):
    shapes = ({k: tuple(v.shape) for k, v in buf.parts.items()} if _buffers.is_compressed(buf)
              else {"full": tuple(buf.shape)})
    # A complex leaf's full buffer is complex (optax.ema's, and Flora's own uncompressed one).
    naive_bytes = (math.prod(np.shape(leaf)) * np.dtype(jax.numpy.promote_types(
        options.dtype, leaf.dtype)).itemsize if jax.numpy.iscomplexobj(leaf)
                   else _naive_bytes(np.shape(leaf), options.dtype))
    rows.append(LeafMemory(name, tuple(np.shape(leaf)), _buffers.is_compressed(buf), shapes,
                           state_bytes(buf), naive_bytes))
  return MemoryReport(rank=options.rank, leaves=tuple(rows))
