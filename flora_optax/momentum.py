"""Compressed momentum: an exponential moving average kept in a random sketch (Algorithm 2)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_optax import _buffers, _layout, _options

TRANSFERS = ("auto", "unbiased", "least_squares")
EMITS = ("compressed", "exact_gradient", "residual")
# The rounding counter of a buffer stored again after its transfer to a new cycle's draws
# (an ordinary store's counter is the cycle step, never this value).
TRANSFER_STEP = np.uint32(0xFFFFFFFF)
# transfer="auto" keeps the paper's unbiased transfer for a leaf only while its noise is damped
# with margin: each transfer multiplies the carried state by ≈ sqrt(d/rank) and the decay
# shrinks it by decay**kappa in between, so the noise stays bounded iff the product is < 1
# (docs/spec.md); at 1/2 its variance is amplified by at most 1/(1 - 1/4) = 4/3.
AUTO_UNBIASED_BELOW = 0.5


class FloraMomentumState(NamedTuple):
  """State of :func:`flora_momentum`.

  Attributes:
    count: updates seen so far (int32, saturating like optax's counters).
    cycle: number of the sketch in use (uint32; wraps around after 2**32 resamples).
    cycle_step: updates done with the current sketch (int32); the sketch is resampled when
      it reaches ``kappa``.
    key_data: raw data of the base PRNG key (``uint32[2]`` for threefry): sketches are
      regenerated from it, never stored; it survives checkpoints and resharding.
    kappa: the resample period the state was built with (int32, 0 for never); a record for
      checks across processes and restores (``check_processes_agree``); ``update`` uses the
      transform's own ``kappa``.
    layout: the format of the buffers (int32: version, sketch, projection, side), so that a
      state saved under other options is refused by name (:func:`flora_optax.check_layout`,
      :func:`flora_optax.restore`), not decoded with the wrong sketch.
    compressed_mu: the momentum, a tree like the parameters: a ``Compressed`` node per
      compressed leaf, the plain EMA buffer for the others.
  """

  count: jax.Array
  cycle: jax.Array
  cycle_step: jax.Array
  key_data: jax.Array
  kappa: jax.Array
  layout: jax.Array
  compressed_mu: Any


def flora_momentum(
    rank: int,
    decay: float | jax.Array = 0.9,
    kappa: int | None = 1000,
    seed: int = 0,
    *,
    transfer: str = "least_squares",
    emit: str = "residual",
    residual_weight: float | jax.Array | None = None,
    **compression,
) -> optax.GradientTransformation:
  r"""An EMA of the updates, like ``optax.ema(decay, debias=False)``, kept compressed.

  For every compressed leaf (a matrix ``G``, or a batch of them) the EMA is kept as a sketch
  regenerated from a PRNG key and resampled every ``kappa`` steps. With the paper's one-sided
  projection (``sketch="projection"``, a random ``(rank, m)`` matrix ``A`` with
  ``E[AᵀA] = I``) each step is

  .. math::  M \leftarrow \beta M + (1-\beta)\, G A^\top, \qquad
             \text{emit } M A \quad (\text{so } E[MA] = \text{the EMA}).

  With ``sketch="two_sided"`` the EMA of a range and a co-range sketch is kept and the
  emitted momentum is its rank-``k`` reconstruction: exact when the EMA has rank ``≤ k``,
  close to its best rank-``k`` approximation otherwise (biased, but with no noise; one QR of
  an ``n × k`` matrix per leaf and step).

  With ``sketch="factors"`` the EMA is kept as a product ``B A`` of thin factors (LoRA-Pre,
  Wang et al., ICLR 2026), each update folded in by one least-squares Newton step per factor:
  no draw after the start, nothing resampled (``kappa`` has no effect), the subspace follows
  the updates.

  At a resample the momentum moves to the new sketch through small matrices, never a
  full-size one. For the projection ``transfer`` picks how:

  * ``"least_squares"`` (default): the new buffer whose decompression is closest to the old
    one: a projection, so the state never grows, but it keeps only ≈ ``rank/d`` of the history;
  * ``"unbiased"``: the paper's up-with-the-old, down-with-the-new ``M ← M A_old A_newᵀ``;
    each transfer multiplies the carried state by ≈ ``sqrt(d/rank)`` of noise, which
    diverges unless ``decay**kappa * sqrt(d/rank) < 1``;
  * ``"auto"``: unbiased for a leaf where ``decay**kappa * sqrt(d/rank) < 1/2``, least
    squares elsewhere.

  The two-sided sketch re-sketches its reconstruction ``Q B``: ``Y' = Q (B Ω'ᵀ)``,
  ``W' = (Ψ' Q) B``.

  ``emit`` picks what is passed on: ``"residual"`` (default: the decompressed EMA plus
  ``w·(I - P) G_t``, the part of the current update outside the sketch's subspace, known
  exactly at no memory cost; ``w = residual_weight``, 1 by default: outside the subspace the
  update is the gradient itself, inside it the momentum), ``"compressed"`` (Algorithm 2, the
  paper's and 0.1's default: the decompressed EMA) or ``"exact_gradient"``
  (``β·up(M_{t-1}) + (1-β)·G_t``: only the history compressed).

  Defaults (0.2): ``sketch="projection", projection="dct", emit="residual"``, the
  seed-keyed sketch with the lowest worst-task loss at rank d/4 in the quality suite
  (``docs/benchmarks.md``). The paper's method is ``projection="gaussian",
  emit="compressed"`` (0.1's defaults; a state written before 0.2.0 is read only with those,
  see :func:`flora_optax.restore`).

  Leaves that are not compressed (vectors, scalars, masked-out leaves, leaves whose buffer
  would not shrink, integer and complex leaves) keep ``optax.ema``'s exact arithmetic.

  .. warning::
    The projection's decompression inflates: ``‖M A‖ ≈ sqrt(1 + d/rank)·‖EMA‖``. Put a
    normalising step after it (``optax.clip_by_block_rms``, as :func:`flora_adafactor` does)
    or lower the learning rate. The two-sided sketch does not inflate.

  Non-finite updates propagate into the state as with ``optax.ema``, but further: one NaN
  entry of a gradient spreads to its whole row (or column) of a projection's buffer, and to
  the whole leaf of a two-sided sketch. Wrap the chain in ``optax.apply_if_finite`` to skip
  such steps.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax.chain(flora_optax.flora_momentum(rank=8, decay=0.9, kappa=100),
    ...                  optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> state[0].compressed_mu["w"].parts["c"].shape, state[0].compressed_mu["b"].shape
    ((64, 8), (32,))
    >>> updates, state = tx.update(params, state, params)

  Args:
    rank: a compressed leaf keeps about ``rank × max(n, m)`` numbers (static int).
    decay: EMA decay ``β`` in ``[0, 1)``; may be a traced array (``inject_hyperparams``).
    kappa: resample every ``kappa`` steps (paper: 1000); ``None`` keeps one sketch forever.
      May be traced under ``inject_hyperparams``.
    seed: seed of the sketches, used for nothing else. Transforms of different kinds never
      share draws, but two ``flora_momentum`` with the same seed draw the same sketches for
      leaves of the same path: give them different seeds.
    transfer: ``"least_squares"`` (default), ``"unbiased"`` or ``"auto"`` (projection only).
    emit: ``"residual"`` (default), ``"compressed"`` (the paper's) or ``"exact_gradient"``.
    residual_weight: ``w`` of ``emit="residual"`` (default 1; ``1 - decay`` is the current
      step's share of an EMA started from zero, the form measured before 0.2.0: worse on
      every task of the quality suite but the momentum-sensitive one, see docs/benchmarks.md).
      A number ``>= 0`` (may be traced); refused with another ``emit``.
    **compression: the compression options of :class:`flora_optax.Compression` (``sketch``,
      ``projection``, ``mask``, ``axes``, ``side``, ``dtype``, ``precision``, ``prng_impl``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`FloraMomentumState`.

  References:
    Hao, Cao, Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  init_fn, step = momentum_parts(rank, decay, kappa, seed, transfer=transfer, emit=emit,
                                 residual_weight=residual_weight, **compression)
  return optax.GradientTransformation(init_fn, lambda updates, state, params=None: step(
      updates, state))


def momentum_parts(rank, decay, kappa, seed, *, transfer="least_squares", emit="residual",
                   residual_weight=None, **compression):
  """``(init_fn, step)`` of :func:`flora_momentum`, its arguments checked (same defaults).

  ``step(updates, state, scaled=None)`` is ``update``; `scaled` is a tree like the buffers
  with a :class:`_buffers.Scaled` for compressed leaves whose update is a diagonally scaled
  array (``flora_adafactor`` passes its factored preconditioner so). Those leaves are
  compressed from it and their `updates` entry is not read (``emit="residual"`` forms the
  scaled update only inside its final sum); ``emit="exact_gradient"`` ignores `scaled`.
  """
  options = _options.compression_from(compression, rank)
  _options.check_decay(decay)
  kappa = _options.check_kappa(kappa)
  _options.check_choice(transfer, TRANSFERS, "transfer")
  _options.check_choice(emit, EMITS, "emit")
  residual_weight = check_residual_weight(residual_weight, emit)
  if options.sketch != "projection" and transfer != "least_squares":
    raise ValueError(f"transfer={transfer!r} applies to sketch='projection' only")
  seed = _options.check_seed(seed)
  compute, impl = options.compute_dtype, options.prng_impl
  spec = (("transform", "momentum"), ("transfer", transfer))
  layout = _options.layout_code(options)

  def init_fn(params):
    key_data = _options.base_key_data(seed, _options.DOMAIN_MOMENTUM, impl)
    return FloraMomentumState(
        count=jnp.zeros([], jnp.int32), cycle=jnp.zeros([], jnp.uint32),
        cycle_step=jnp.zeros([], jnp.int32), key_data=key_data,
        kappa=jnp.asarray(0 if kappa is None else kappa, jnp.int32),
        layout=jnp.asarray(layout, jnp.int32),
        compressed_mu=_buffers.init(params, options, spec, key_data=key_data))

  def step(updates, state, scaled=None):
    if emit == "exact_gradient":
      scaled = None
    updates, rebox = _layout.unbox(updates)
    _options.check_layout_value(state.layout, layout, "flora_momentum")
    _buffers.check(updates, state.compressed_mu, "momentum", options, spec)
    stored = state.compressed_mu
    resample = jnp.asarray(False) if kappa is None else state.cycle_step >= kappa
    cycle = state.cycle + resample.astype(jnp.uint32)
    draws = _buffers.draw(stored, state.key_data, cycle, impl)
    if kappa is not None and _buffers.any_compressed(stored):
      how = lambda leaf: resolve_transfer(transfer, decay, kappa, leaf.dim, leaf.rank)  # noqa: E731

      def moved(s):
        m = _buffers.to_compute(s, compute)
        m = _buffers.transfer(m, _buffers.draw(m, state.key_data, state.cycle, impl), draws,
                              how)
        # Stored again (bfloat16 and int8 round stochastically, under their own counter):
        # the conditional then carries the stored form, and the dequantization below fuses
        # into the fold instead of writing a float32 buffer out of the conditional. Plain
        # leaves were not moved and keep their stored values.
        m = _buffers.store(m, s, state.key_data, impl, cycle, TRANSFER_STEP)
        return _buffers.map_leaves(lambda new, old: new if _buffers.is_compressed(old) else old,
                                   m, s)

      stored = jax.lax.cond(resample, moved, lambda s: s, stored)
    mu = _buffers.to_compute(stored, compute)
    new_mu = _buffers.fold(mu, updates, draws, compute, scaled=scaled, rate=1 - decay,
                           mix=lambda m, c: (1 - decay) * c + decay * m)
    if emit == "exact_gradient":
      out = jax.tree.map(lambda m, g: decay * m + (1 - decay) * g,
                         _buffers.decompress(mu, draws), updates)
    else:
      residual = None
      if emit == "residual":   # a scaled leaf's update is read through its Scaled form
        residual = updates if scaled is None else jax.tree.map(
            lambda s, u: u if s is None else s, scaled, updates,
            is_leaf=lambda x: x is None or isinstance(x, _buffers.Scaled))
      out = _buffers.decompress(new_mu, draws, residual, residual_scale=residual_weight)
    cycle_step = jnp.where(resample, 1, optax.safe_increment(state.cycle_step))
    return rebox(optax.tree.cast_like(out, updates)), FloraMomentumState(
        count=optax.safe_increment(state.count), cycle=cycle, cycle_step=cycle_step,
        key_data=state.key_data, kappa=state.kappa, layout=state.layout,
        compressed_mu=_buffers.store(new_mu, state.compressed_mu, state.key_data, impl, cycle,
                                     state.cycle_step))

  return init_fn, step


def check_residual_weight(weight, emit):
  """``residual_weight`` as given, 1 where it is not; an error where it would do nothing or
  is not a number ``>= 0``."""
  if weight is None:
    return 1.0
  if emit != "residual":
    raise ValueError(f"residual_weight applies to emit='residual' only, got emit={emit!r} and "
                     f"residual_weight={weight!r}")
  if isinstance(weight, jax.core.Tracer):
    return weight
  if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.number)) \
      or not math.isfinite(weight) or weight < 0:
    raise ValueError(f"residual_weight must be a finite number >= 0, got "
                     f"residual_weight={weight!r}")
  return float(weight)


def resolve_transfer(transfer, decay, kappa, dim, rank):
  """The transfer a leaf uses: ``transfer`` itself, or for ``"auto"`` the unbiased one where
  ``decay**kappa * sqrt(dim/rank) < 1/2`` and least squares elsewhere. With a traced decay
  or kappa the answer is a traced bool (True: unbiased)."""
  if transfer != "auto":
    return transfer
  growth = math.sqrt(dim / rank)
  if isinstance(kappa, int) and not isinstance(decay, jax.core.Tracer):
    return "unbiased" if float(decay)**kappa * growth < AUTO_UNBIASED_BELOW else "least_squares"
  return jnp.asarray(decay, jnp.float32)**kappa * growth < AUTO_UNBIASED_BELOW
