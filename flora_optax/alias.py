"""Ready-made optimizers built from the Flora transforms."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flora_optax._compression import check_decay
from flora_optax.accumulation import flora_accumulate
from flora_optax.momentum import flora_momentum

MOMENTUM_POSITIONS = ("after_factored_rms", "after_param_scale")


def flora_adafactor(
    learning_rate: optax.ScalarOrSchedule | None,
    rank: int,
    momentum: float | jax.Array | None = 0.9,
    kappa: int | None = 1000,
    seed: int = 0,
    *,
    min_dim_size_to_factor: int | None = None,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    weight_decay_rate: optax.ScalarOrSchedule | None = None,
    weight_decay_mask: Any = None,
    eps: float = 1e-30,
    factored: bool = True,
    momentum_position: str = "after_factored_rms",
    accumulate_every: int | Any | None = None,
    accumulate_rank: int | None = None,
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    projection: str = "gaussian",
    transfer: str = "least_squares",
    emit: str = "compressed",
    dtype: Any = "float32",
    precision: Any = None,
    prng_impl: str = "threefry2x32",
    should_skip_update_fn: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor with Flora momentum (and optionally Flora gradient accumulation).

  The same pieces and defaults as ``optax.adafactor``::

      scale_by_factored_rms → clip_by_block_rms → learning rate → param_block_rms
      → add_decayed_weights → scale(-1)

  with :func:`flora_momentum` in place of ``optax.ema``. Where it sits is
  ``momentum_position``:

  * ``"after_factored_rms"`` (default, the authors' placement): the momentum sees the
    RMS-normalised update and ``clip_by_block_rms`` then tames the ``sqrt(d/rank)``
    inflation of the decompressed momentum;
  * ``"after_param_scale"`` (where ``optax.adafactor`` puts its ``ema``): nothing rescales
    the decompressed momentum, whose norm is ``≈ sqrt(d/rank)`` times the true EMA's.

  ``docs/benchmarks.md`` has the measurement behind the default.

  With ``accumulate_every=k`` (an int or a schedule) the whole chain is wrapped in
  :func:`flora_accumulate` (rank ``accumulate_rank``, default ``rank``), the compressed
  counterpart of ``optax.MultiSteps(optax.adafactor(...), k)``.

  Works under ``optax.inject_hyperparams(flora_adafactor, static_args=("rank", "kappa",
  "seed"))``: ``learning_rate``, ``momentum``, ``decay_rate``, ``clipping_threshold`` and
  ``eps`` may then be traced arrays. Options that shape the computation
  (``min_dim_size_to_factor``, ``accumulate_every``, ``accumulate_rank``) default to
  ``None`` so that ``inject_hyperparams`` leaves them alone; if you set one, list it in
  ``static_args`` too.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
    >>> tx = flora_optax.flora_adafactor(learning_rate=1e-2, rank=32, kappa=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a float or schedule (``None``: no learning-rate scaling).
    rank: rank of the Flora projections.
    momentum: EMA decay; ``None`` for no momentum (then this is ``optax.adafactor``).
    kappa, seed: see :func:`flora_momentum`.
    min_dim_size_to_factor: as in ``optax.adafactor`` (``None`` means its default, 128).
    decay_rate: as in ``optax.adafactor``.
    decay_offset: as in ``optax.adafactor``.
    multiply_by_parameter_scale: as in ``optax.adafactor``.
    clipping_threshold: as in ``optax.adafactor``.
    weight_decay_rate: as in ``optax.adafactor``.
    weight_decay_mask: as in ``optax.adafactor``.
    eps: as in ``optax.adafactor``.
    factored: as in ``optax.adafactor``.
    momentum_position: ``"after_factored_rms"`` or ``"after_param_scale"``.
    accumulate_every: micro-steps per update (int or schedule), or ``None``.
    accumulate_rank: rank of the accumulation projections (default ``rank``).
    mask, axes, side, projection, dtype, precision, prng_impl: compression options shared
      by momentum and accumulation, see :func:`flora_momentum`.
    transfer, emit: momentum options, see :func:`flora_momentum`.
    should_skip_update_fn: passed to :func:`flora_accumulate`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if momentum_position not in MOMENTUM_POSITIONS:
    raise ValueError(f"momentum_position must be one of {MOMENTUM_POSITIONS}, got "
                     f"{momentum_position!r}")
  if should_skip_update_fn is not None and accumulate_every is None:
    raise ValueError("should_skip_update_fn only applies with accumulate_every; wrap the "
                     "optimizer in optax.apply_if_finite to skip non-finite steps instead")
  compression = dict(mask=mask, axes=axes, side=side, projection=projection, dtype=dtype,
                     precision=precision, prng_impl=prng_impl)
  flora_mu = None
  if momentum is not None:
    check_decay(momentum, "momentum")
    flora_mu = flora_momentum(rank, momentum, kappa, seed, transfer=transfer, emit=emit,
                              **compression)

  if min_dim_size_to_factor is None:
    min_dim_size_to_factor = 128  # optax.adafactor's default
  tx = [optax.scale_by_factored_rms(factored, decay_rate, decay_offset,
                                    min_dim_size_to_factor, eps)]
  if flora_mu is not None and momentum_position == "after_factored_rms":
    tx.append(flora_mu)
  if clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(clipping_threshold))
  if learning_rate is not None:
    tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(optax.scale_by_param_block_rms())
  if flora_mu is not None and momentum_position == "after_param_scale":
    tx.append(flora_mu)
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  tx.append(optax.scale(-1))
  chain = optax.chain(*tx)
  if accumulate_every is None:
    return chain
  return flora_accumulate(
      chain, accumulate_every, rank if accumulate_rank is None else accumulate_rank, seed,
      should_skip_update_fn=should_skip_update_fn, **compression)
