"""Looking inside Flora: regenerate projections, count optimizer-state bytes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _compression as comp

_DOMAINS = {"momentum": comp.DOMAIN_MOMENTUM, "accumulate": comp.DOMAIN_ACCUMULATE,
            "microbatch": comp.DOMAIN_MICROBATCH}


def projections(
    params: Any,
    rank: int,
    cycle: jax.typing.ArrayLike,
    seed: int = 0,
    *,
    transform: str = "momentum",
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    projection: str = "gaussian",
    dtype: Any = "float32",
    prng_impl: str = "threefry2x32",
) -> Any:
  """Regenerates the projection matrices a Flora transform uses in a given cycle.

  The cycle of :func:`flora_momentum` at step ``t`` (its state's ``count`` before the
  update) is ``t // kappa``; the cycle of :func:`flora_accumulate` is its state's
  ``gradient_step``; that of :func:`compressed_mean` is its ``cycle`` argument.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    rank, seed, mask, axes, side, projection, dtype, prng_impl: the options the transform
      was built with.
    cycle: the cycle number.
    transform: ``"momentum"``, ``"accumulate"`` or ``"microbatch"``.

  Returns:
    A tree like ``params`` holding, for each compressed leaf, its projection ``A`` of shape
    ``(*batch, rank, d)`` (compressed ``C = X Aᵀ`` or ``C = A X`` on the leaf's matrix view),
    and ``None`` for the leaves that are not compressed.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> a = flora_optax.projections({"w": jnp.ones((64, 32))}, rank=8, cycle=0)
    >>> a["w"].shape
    (8, 32)
  """
  if transform not in _DOMAINS:
    raise ValueError(f"transform must be one of {tuple(_DOMAINS)}, got {transform!r}")
  compressor = comp.Compressor(rank=rank, domain=_DOMAINS[transform], mask=mask, axes=axes,
                               side=side, projection=projection, dtype=dtype,
                               prng_impl=prng_impl)
  key_data = compressor.base_key_data(seed)
  plans = compressor.plan(params)
  mats = compressor.projection_matrices(key_data, plans, cycle)
  return jax.tree.unflatten(jax.tree.structure(params), mats)


def state_bytes(tree: Any) -> int:
  """Total bytes of the arrays (or ``jax.ShapeDtypeStruct``) in a tree.

  Use ``state_bytes(jax.eval_shape(tx.init, params))`` to size a state without building it.
  """
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  """One row of a :class:`MemoryReport`."""

  name: str
  shape: tuple[int, ...]
  compressed: bool
  buffer_shape: tuple[int, ...]
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
      rows.append((leaf.name, "x".join(map(str, leaf.shape)) or "()",
                   "x".join(map(str, leaf.buffer_shape)) + ("" if leaf.compressed else " (full)"),
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


def memory_report(
    params: Any,
    rank: int,
    *,
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    dtype: Any = "float32",
) -> MemoryReport:
  """Bytes of one Flora buffer (momentum or accumulator) per leaf, against a naive one.

  The naive buffer is a full-size array of ``dtype`` per leaf (what ``optax.ema`` or
  ``optax.MultiSteps`` keep); Flora keeps ``rank × (uncompressed side)`` for compressed leaves.
  Counters and key data (a few bytes per transform) are not included; use
  :func:`state_bytes` on a real state for the exact total.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> report = flora_optax.memory_report({"w": jnp.ones((512, 256))}, rank=32)
    >>> report.num_compressed, round(report.ratio, 3)
    (1, 0.125)
  """
  compressor = comp.Compressor(rank=rank, domain=0, mask=mask, axes=axes, side=side,
                               dtype=dtype)
  itemsize = compressor.dtype.itemsize
  rows = []
  for p in compressor.plan(params):
    rows.append(LeafMemory(p.name, p.shape, p.compressed, p.state_shape,
                           math.prod(p.state_shape) * itemsize, math.prod(p.shape) * itemsize))
  return MemoryReport(rank=compressor.rank, leaves=tuple(rows))
