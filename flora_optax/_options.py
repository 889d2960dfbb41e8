"""Compression options, their defaults and their validation, written once; PRNG keys.

Every public transform takes the compression keywords of :class:`Compression` as
``**compression`` and builds one ``Compression`` from them, so a default or a check lives here
only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _layout

SKETCHES = ("projection", "two_sided", "factors")
PROJECTIONS = ("gaussian", "orthogonal", "rademacher", "dct")
SIDES = ("smaller", "larger", "rows", "cols")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
STORAGE_DTYPES = ("float32", "bfloat16", "float64", "int8")

# The defaults of each role, chosen by the quality suite (docs/benchmarks.md, "Which sketch";
# `python -m benchmarks.quality`): at rank d/4 the seed-keyed sketch with the lowest worst-task
# loss ratio was the DCT projection with emit="residual" for momentum, the two-sided sketch for
# accumulation. 0.1's were sketch="projection", projection="gaussian" (emit="compressed") for
# both. `sketch` unset but `projection` or `side` given means sketch="projection".
ROLES = ("momentum", "accumulation")
DEFAULT_SKETCH = {"momentum": "projection", "accumulation": "two_sided"}
DEFAULT_PROJECTION = "dct"
# A state's `layout` code (see `layout_code`): the format of the buffers, so that a state
# saved under other options (0.1's defaults, say) is refused by name, not decoded wrongly.
FORMAT_VERSION = 2

# Domain tags folded into the base key, so that the transforms of one chain built with the
# same seed (flora_momentum inside flora_accumulate) never draw the same random numbers.
DOMAIN_MOMENTUM = 1
DOMAIN_ACCUMULATE = 2
DOMAIN_MICROBATCH = 3
DOMAIN_EMA = 4
# Folded in where a leaf's key id would go, to draw stochastic-rounding bits; key ids are
# below 2**31 (`_layout.key_id`), so no leaf's projection key can equal a rounding key.
ROUNDING_TAG = 2**32 - 1
_INT32_MAX = 2**31 - 1


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _traced_hint(name) -> str:
  return (f"{name} must be a static Python int, got a traced array; with "
          f"optax.inject_hyperparams pass static_args=({name!r}, ...)")


def check_rank(rank) -> int:
  return check_count(rank, "rank")


def check_int(value, name: str, low: int, high: int, *, traced_ok: bool = False):
  """An int in ``[low, high)`` (a concrete 0-d integer array is accepted too). A traced
  integer scalar is passed through where `traced_ok` (``inject_hyperparams`` traces every
  numeric argument it is not told is static); elsewhere the error names ``static_args``."""
  span = f"[{low}, {'2**31 - 1]' if high == 2**31 else '2**64)' if high == 2**64 else high}"
  if isinstance(value, jax.core.Tracer):
    if not traced_ok:
      raise TypeError(_traced_hint(name))
    if value.ndim or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer scalar, got a traced "
                      f"{value.dtype}{value.shape}")
    return value
  if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0 and jnp.issubdtype(
      value.dtype, jnp.integer):
    value = int(value)
  if not _is_int(value):
    raise TypeError(f"{name} must be an int in {span}, got {name}={value!r} "
                    f"({type(value).__name__})")
  if not low <= value < high:
    raise ValueError(f"{name} must be an int in {span}, got {name}={value!r}")
  return int(value)


def check_count(value, name: str, allow_traced: bool = False):
  """A positive int below 2**31, or (with `allow_traced`) a traced one."""
  return check_int(value, name, 1, _INT32_MAX + 1, traced_ok=allow_traced)


def check_kappa(kappa):
  """``None``, a positive int below 2**31, or a traced integer (``inject_hyperparams``)."""
  return None if kappa is None else check_count(kappa, "kappa", allow_traced=True)


def check_seed(seed):
  """An int in [0, 2**64), or a traced integer (the key is then made inside the trace)."""
  return check_int(seed, "seed", 0, 2**64, traced_ok=True)


def check_decay(decay, name="decay"):
  """A float in [0, 1) (or a traced scalar under ``inject_hyperparams``)."""
  if isinstance(decay, jax.core.Tracer):
    return decay
  if isinstance(decay, (str, bytes)) or callable(decay):
    raise TypeError(f"{name} must be a float in [0, 1), got {name}={decay!r}; schedules are "
                    f"not supported (use optax.inject_hyperparams to change it over time)")
  try:
    value = float(decay)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a float in [0, 1), got {name}={decay!r}") from None
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {name}={value}")
  return decay


def check_choice(value, choices, name):
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class Compression:
  """How every compressed buffer of a transform is stored. Defaults live here only.

  Attributes:
    rank: the memory of a compressed leaf is about ``rank × max(n, m)`` numbers for every
      sketch (static int).
    sketch: ``"projection"`` (the paper's one-sided random projection), ``"two_sided"``
      (a range and a co-range sketch, reconstructed as a rank-``k`` approximation) or
      ``"factors"`` (online low-rank factors ``B A``, LoRA-Pre's method: not a random
      sketch; the subspace follows the updates).
      Default: the role's (``"projection"`` for momentum, ``"two_sided"`` for accumulation,
      measured best at rank d/4 in ``docs/benchmarks.md``); ``"projection"`` where
      ``projection`` or ``side`` is given.
    projection: kind of one-sided projection: ``"dct"`` (default: orthogonal rows without a
      QR: random signs, a DCT, random rows), ``"gaussian"`` (the paper's, and 0.1's default),
      ``"orthogonal"`` (Haar rows by a QR) or ``"rademacher"``.
    mask: which leaves to compress: ``None`` (every real floating leaf with at least 2 axes
      whose buffer would shrink), a pytree (prefix) of bools, or a callable ``params -> tree``.
    axes: how leaves are viewed as matrices: ``None`` (2-D as is; more axes: all but the last
      are rows), a :class:`MatrixAxes`, a pytree (prefix) of them, or a callable.
    side: side a projection compresses: ``"smaller"``, ``"larger"``, ``"rows"``, ``"cols"``.
    dtype: storage dtype of the buffers: ``"float32"``, ``"bfloat16"`` (rounded
      stochastically), ``"float64"`` (with ``jax_enable_x64``) or ``"int8"`` (absmax-scaled
      blocks of ``INT8_BLOCK = 256`` entries along each buffer's last axis, one float32 scale
      per block, rounded stochastically; see ``docs/howto/int8.md``). Arithmetic runs in
      float32 at least: a buffer is widened on load and rounded once on store.
    plain_dtype: storage dtype of the buffers of leaves that are *not* compressed (vectors,
      scalars, masked-out leaves), from the same list. ``None`` (default): ``dtype``, except
      that ``dtype="int8"`` keeps them in float32: they are usually a small share of the
      state, and bitsandbytes keeps tensors under 4096 entries in 32 bits for the same
      reason. ``plain_dtype="int8"`` quantizes them too (with ``mask=False``: a full-size
      8-bit EMA; :func:`flora_optax.int8_ema` is that as a drop-in for ``optax.ema``).
      Scalars, integer and complex leaves never use int8 (they keep float32 or their own
      complex type).
    precision: ``jax.lax.Precision`` of the sketch matmuls (``None``: JAX's default).
    prng_impl: ``"threefry2x32"`` (same numbers under any sharding) or ``"rbg"`` /
      ``"unsafe_rbg"`` (faster; numbers may change with sharding).
  """

  rank: int
  sketch: str | None = None
  projection: str | None = None
  mask: Any = None
  axes: Any = None
  side: str = "smaller"
  dtype: Any = "float32"
  plain_dtype: Any = None
  precision: Any = None
  prng_impl: str = "threefry2x32"

  def __post_init__(self):
    object.__setattr__(self, "rank", check_rank(self.rank))
    if self.sketch is None:
      object.__setattr__(self, "sketch", DEFAULT_SKETCH["momentum"])
    check_choice(self.sketch, SKETCHES, "sketch")
    if self.projection is not None:
      check_choice(self.projection, PROJECTIONS, "projection")
    check_choice(self.side, SIDES, "side")
    check_choice(self.prng_impl, PRNG_IMPLS, "prng_impl")
    if self.sketch != "projection" and (self.projection is not None or self.side != "smaller"):
      raise ValueError(f"projection={self.projection!r} and side={self.side!r} apply to "
                       f"sketch='projection' only; sketch={self.sketch!r} keeps both sides")
    if self.sketch == "projection" and self.projection is None:
      object.__setattr__(self, "projection", DEFAULT_PROJECTION)
    object.__setattr__(self, "dtype", check_storage_dtype(self.dtype, "dtype"))
    if self.plain_dtype is not None:
      object.__setattr__(self, "plain_dtype", check_storage_dtype(self.plain_dtype,
                                                                  "plain_dtype"))
    if self.precision is not None:
      try:
        object.__setattr__(self, "precision", jax.lax.Precision(self.precision))
      except (ValueError, KeyError, TypeError):
        raise ValueError(f"precision must be None or a jax.lax.Precision, got "
                         f"precision={self.precision!r}") from None

  @property
  def plain_storage_dtype(self):
    """The storage dtype of uncompressed leaves (see ``plain_dtype``)."""
    if self.plain_dtype is not None:
      return self.plain_dtype
    return jnp.dtype(jnp.float32) if self.dtype == jnp.int8 else self.dtype

  @property
  def compute_dtype(self):
    """Sketches and arithmetic run in at least float32, whatever the storage dtype."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def static(self) -> tuple[tuple[str, Any], ...]:
    """The options that shape a buffer, as (name, value) pairs with a stable repr."""
    return (("rank", self.rank), ("sketch", self.sketch), ("projection", self.projection),
            ("side", self.side), ("dtype", str(self.dtype)),
            ("plain_dtype", str(self.plain_storage_dtype)), ("precision", str(self.precision)),
            ("prng_impl", self.prng_impl))


def check_storage_dtype(value, name: str):
  """One of :data:`STORAGE_DTYPES` as a ``numpy.dtype``; the error lists what is offered."""
  try:
    dtype = None if value is None or isinstance(value, bool) else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or str(dtype) not in STORAGE_DTYPES:
    raise ValueError(
        f"{name} must be one of {STORAGE_DTYPES}, got {name}={value!r}; float16 is refused (a "
        f"float16 EMA stalls short of its target), and of the integer formats only int8 with "
        f"float32 block scales is offered (uint8 and int4 are not)")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError(f"{name}='float64' needs jax.config.update('jax_enable_x64', True)")
  return dtype


def var_keywords(kwargs: dict, name: str) -> dict:
  """``**kwargs`` of a public function, unwrapped where ``optax.inject_hyperparams`` (which
  binds the signature) passed them on as one keyword named after the parameter."""
  if name in kwargs and isinstance(kwargs[name], dict):
    kwargs = dict(kwargs)
    kwargs.update(kwargs.pop(name))
  return kwargs


def compression_from(kwargs: dict, rank, role: str = "momentum") -> Compression:
  """``Compression(rank, **kwargs)`` with the `role`'s default sketch (``"momentum"`` or
  ``"accumulation"``), and an error naming the unknown keyword."""
  kwargs = var_keywords(kwargs, "compression")
  known = {f.name for f in dataclasses.fields(Compression)} - {"rank"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise TypeError(f"unknown option(s) {unknown}; the compression options are {sorted(known)}")
  if kwargs.get("sketch") is None:
    given = kwargs.get("projection") is not None or kwargs.get("side", "smaller") != "smaller"
    kwargs = dict(kwargs, sketch="projection" if given else DEFAULT_SKETCH[role])
  return Compression(rank=rank, **kwargs)


def layout_code(options: Compression) -> int:
  """The format of a transform's buffers as one int32: the version and what decides how a
  buffer is read (sketch, projection, side). Stored in the state as ``layout``."""
  return layout_code_of(options.sketch, options.projection, options.side)


def layout_code_of(sketch: str, projection: str | None, side: str) -> int:
  projection_id = PROJECTIONS.index(projection) + 1 if projection else 0
  return (FORMAT_VERSION * 10000 + SKETCHES.index(sketch) * 1000 + projection_id * 100
          + SIDES.index(side) * 10)


def layout_error(where: str, saved: int, expected: int) -> str | None:
  """Why a state saved with layout `saved` cannot be read by a transform of `expected`."""
  if int(saved) == int(expected):
    return None
  return (f"{where}: the state was saved with {describe_layout(saved)}, and this transform "
          f"reads {describe_layout(expected)}; build the transform with "
          f"{describe_layout(saved)} to read it (the defaults changed in 0.2: see CHANGELOG.md)")


def check_layout_value(value, expected: int, where: str) -> None:
  """Refuses a concrete `layout` other than `expected` (a traced one is checked by
  :func:`flora_optax.check_layout` after a restore, not here)."""
  if isinstance(value, jax.core.Tracer):
    return
  error = layout_error(where, np.asarray(value), expected)
  if error:
    raise ValueError(error)


def describe_layout(code: int) -> str:
  """The options a `layout_code` stands for, as keywords (or why it is not one)."""
  version, rest = divmod(int(code), 10000)
  sketch, rest = divmod(rest, 1000)
  projection, rest = divmod(rest, 100)
  side = rest // 10
  if version != FORMAT_VERSION or not (sketch < len(SKETCHES) and projection <= len(PROJECTIONS)
                                       and side < len(SIDES)):
    return f"an unknown layout code {int(code)}"
  words = [f"sketch={SKETCHES[sketch]!r}"]
  if projection:
    words += [f"projection={PROJECTIONS[projection - 1]!r}"]
  if SIDES[side] != "smaller":
    words += [f"side={SIDES[side]!r}"]
  return ", ".join(words)


# ----------------------------------------------------------------------------- keys


def base_key_data(seed: int, domain: int, prng_impl: str) -> jax.Array:
  """Raw data of the base key of a transform, a fresh array on every call (so donating one
  state never deletes another's). Seeds up to 2**64 are folded in as two 32-bit words."""
  seed = check_seed(seed)
  if isinstance(seed, jax.core.Tracer):  # a traced int32: its high word is 0
    low, high = seed, np.uint32(0)
  else:
    low, high = seed & 0xFFFFFFFF, np.uint32(seed >> 32)
  key = jax.random.key(low, impl=prng_impl)
  key = jax.random.fold_in(jax.random.fold_in(key, high), domain)
  return jax.random.key_data(key)


def leaf_key(key_data, prng_impl: str, leaf_id, cycle):
  key = jax.random.wrap_key_data(key_data, impl=prng_impl)
  return jax.random.fold_in(jax.random.fold_in(key, leaf_id), cycle)


def rounding_key(key_data, prng_impl: str, name: str, steps):
  key = jax.random.wrap_key_data(key_data, impl=prng_impl)
  key = jax.random.fold_in(jax.random.fold_in(key, np.uint32(ROUNDING_TAG)),
                           np.uint32(_layout.key_id(name)))
  for step in steps:
    key = jax.random.fold_in(key, step)
  return key
