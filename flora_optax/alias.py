"""Ready-made optimizers: optax chains with Flora momentum in place of a full-size one."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _buffers, _factored, _layout, _options
from flora_optax.accumulation import _deprecated_accumulate
from flora_optax.momentum import flora_momentum, momentum_parts

MOMENTUM_POSITIONS = ("after_factored_rms", "after_param_scale")
SECOND_MOMENTS = ("full", "factored")
FIRST_MOMENTS = ("raw", "preconditioned")


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
    accumulate_every: Any = None,
    **momentum_options,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor with Flora momentum: ``optax.adafactor``'s chain with a compressed ``ema``.

  ::

      scale_by_factored_rms → clip_by_block_rms → learning rate → param_block_rms
      → add_decayed_weights → scale(-1)

  with :func:`flora_momentum` placed by ``momentum_position``:

  * ``"after_factored_rms"`` (default, the authors' placement): the momentum sees the
    RMS-normalised update and ``clip_by_block_rms`` then tames the inflation of a
    projection's decompressed momentum;
  * ``"after_param_scale"`` (where ``optax.adafactor`` puts its ``ema``).

  For compressed gradient accumulation wrap it:
  ``flora_accumulate(flora_adafactor(...), every_k_schedule=k, rank=r)``.

  Works under ``optax.inject_hyperparams(flora_adafactor, static_args=("rank",))``:
  ``learning_rate``, ``momentum``, ``kappa``, ``decay_rate``, ``clipping_threshold`` and
  ``eps`` may then be traced arrays.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
    >>> tx = flora_optax.flora_adafactor(learning_rate=1e-2, rank=32, kappa=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a float or schedule (``None``: no learning-rate scaling).
    rank: rank of the Flora sketches (static int).
    momentum: EMA decay; ``None`` for no momentum (then this is ``optax.adafactor``).
    kappa, seed: see :func:`flora_momentum`.
    min_dim_size_to_factor: as in ``optax.adafactor`` (``None``: its default, 128).
    decay_rate: as in ``optax.adafactor``.
    decay_offset: as in ``optax.adafactor``.
    multiply_by_parameter_scale: as in ``optax.adafactor``.
    clipping_threshold: as in ``optax.adafactor``.
    weight_decay_rate: as in ``optax.adafactor``.
    weight_decay_mask: as in ``optax.adafactor``.
    eps: as in ``optax.adafactor``.
    factored: as in ``optax.adafactor``.
    momentum_position: ``"after_factored_rms"`` or ``"after_param_scale"``.
    accumulate_every: deprecated; wrap in :func:`flora_accumulate` instead.
    **momentum_options: ``transfer``, ``emit``, ``residual_weight`` (see
      :func:`flora_momentum`) and the options of
      :class:`flora_optax.Compression`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  _options.check_choice(momentum_position, MOMENTUM_POSITIONS, "momentum_position")
  momentum_options = _options.var_keywords(momentum_options, "momentum_options")
  should_skip = momentum_options.pop("should_skip_update_fn", None)
  if should_skip is not None and accumulate_every is None:
    raise ValueError("should_skip_update_fn only applies with accumulation; wrap the optimizer "
                     "in optax.apply_if_finite to skip non-finite steps instead")
  accumulate_rank = momentum_options.pop("accumulate_rank", None)
  compression = {k: v for k, v in momentum_options.items()
                 if k not in ("transfer", "emit", "residual_weight")}
  flora_mu = step = None
  if momentum is not None:
    _options.check_decay(momentum, "momentum")
    init_mu, step = momentum_parts(rank, momentum, kappa, seed, **momentum_options)
    flora_mu = optax.GradientTransformation(init_mu, lambda u, s, p=None: step(u, s))
  else:
    _options.compression_from(compression, rank)
    unused = sorted(momentum_options if accumulate_every is None else
                    set(momentum_options) & {"transfer", "emit", "residual_weight"})
    if unused:
      raise ValueError(f"flora_adafactor(momentum=None) has no compressed momentum, so "
                       f"{', '.join(unused)} would do nothing; drop them (or set a momentum)")
  if min_dim_size_to_factor is None:  # optax.adafactor's default; None keeps it out of
    min_dim_size_to_factor = 128      # inject_hyperparams' numeric hyperparameters
  chain = [optax.scale_by_factored_rms(factored, decay_rate, decay_offset,
                                       min_dim_size_to_factor, eps)]
  if flora_mu is not None and momentum_position == "after_factored_rms":
    chain.append(flora_mu)
  if clipping_threshold is not None:
    chain.append(optax.clip_by_block_rms(clipping_threshold))
  if learning_rate is not None:
    chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms())
  if flora_mu is not None and momentum_position == "after_param_scale":
    chain.append(flora_mu)
  if weight_decay_rate is not None:
    chain.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  chain.append(optax.scale(-1))
  tx = optax.chain(*chain)
  if step is not None and momentum_position == "after_factored_rms":
    tx = _factored.fold_factored_momentum(
        chain[0], step, optax.chain(*chain[2:]), tx.init, factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor)
  if accumulate_every is None:
    return tx
  return _deprecated_accumulate(tx, accumulate_every, accumulate_rank or rank, seed,
                                should_skip, compression)


class ScaleByFloraAdamState(NamedTuple):
  """State of :func:`scale_by_flora_adam`.

  Attributes:
    count: updates seen so far (int32), for the bias corrections.
    mu: the compressed first moment, a :class:`FloraMomentumState`.
    nu: the second moment, never compressed (it must stay non-negative): Adam's full ``nu``,
      or for ``second_moment="factored"`` a tree of ``(row, col)`` statistics for leaves
      with at least 2 axes and full ``nu`` for the others.
  """

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_flora_adam(
    rank: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    kappa: int | None = 1000,
    seed: int = 0,
    *,
    second_moment: str = "full",
    first_moment: str = "preconditioned",
    **momentum_options,
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` whose first moment is a :func:`flora_momentum` buffer.

  For a compressed leaf, ``first_moment="preconditioned"`` (default) keeps the EMA of the
  already-normalised ``g / (sqrt(nu_hat) + eps)``; ``"raw"`` keeps the EMA of the gradients
  (Adam's ``mu``) and divides its decompression by ``sqrt(nu_hat) + eps`` afterwards. The raw
  form is unstable with the projection sketch: decompression moves energy from large
  coordinates of the gradient onto ones whose ``nu`` is tiny, and the division blows those
  up (optax's common test suite diverges on a 2x2 target at rank 1); the normalised form
  bounds every coordinate. Leaves that are not compressed always follow Adam exactly, so
  with ``mask=False`` this equals ``optax.scale_by_adam`` to float tolerance.
  """
  _options.check_choice(second_moment, SECOND_MOMENTS, "second_moment")
  momentum_options = _options.var_keywords(momentum_options, "momentum_options")
  _options.check_choice(first_moment, FIRST_MOMENTS, "first_moment")
  _options.check_decay(b1, "b1")
  _options.check_decay(b2, "b2")
  momentum = flora_momentum(rank, b1, kappa, seed, **momentum_options)

  def init_fn(params):
    nu = _layout.map_unboxed(lambda p: _nu_init(p, second_moment), params)
    return ScaleByFloraAdamState(jnp.zeros([], jnp.int32), momentum.init(params), nu)

  def update_fn(updates, state, params=None):
    del params
    updates, rebox = _layout.unbox(updates)
    count = optax.safe_increment(state.count)
    nu = jax.tree.map(lambda v, g: _nu_update(g, v, b2), state.nu, updates, is_leaf=_is_factored)
    denom = jax.tree.map(lambda v: jnp.sqrt(_nu_full(v) / (1 - b2**count) + eps_root) + eps, nu,
                         is_leaf=_is_factored)
    # Compressed leaves form their first moment where `first_moment` says; the others are
    # exactly Adam's (an EMA of the raw gradient, divided afterwards).
    before = first_moment == "preconditioned"
    divide_first = lambda buf: before and _buffers.is_compressed(buf)  # noqa: E731
    buffers = state.mu.compressed_mu
    mu, mu_state = momentum.update(_buffers.map_leaves(
        lambda buf, g, d: g / d if divide_first(buf) else g, buffers, updates, denom), state.mu)
    out = _buffers.map_leaves(
        lambda buf, m, d: m / (1 - b1**count) if divide_first(buf) else m / (1 - b1**count) / d,
        buffers, mu, denom)
    return rebox(optax.tree.cast_like(out, updates)), ScaleByFloraAdamState(count, mu_state, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class FactoredMoment(NamedTuple):
  """Adafactor-style second moment of a leaf: EMAs of the row and the column means of ``g²``."""

  row: jax.Array
  col: jax.Array


def _is_factored(x) -> bool:
  return isinstance(x, FactoredMoment)


def _nu_init(p, second_moment):
  shape = jnp.shape(p)
  if second_moment == "factored" and len(shape) >= 2:
    return FactoredMoment(jnp.zeros(shape[:-1], jnp.float32),
                          jnp.zeros(shape[:-2] + shape[-1:], jnp.float32))
  return jnp.zeros(shape, jnp.float32)


def _nu_update(g, v, b2):
  """Adam's ``nu`` update; factored: the EMAs of the row and column means of ``g²``."""
  sq = jnp.square(g.astype(jnp.float32))
  if _is_factored(v):
    return FactoredMoment((1 - b2) * jnp.mean(sq, axis=-1) + b2 * v.row,
                          (1 - b2) * jnp.mean(sq, axis=-2) + b2 * v.col)
  return (1 - b2) * sq + b2 * v


def _nu_full(v):
  """The full second moment; factored: Adafactor's ``row ⊗ col / mean(row)``."""
  if not _is_factored(v):
    return v
  row, col = v
  scale = jnp.mean(row, axis=-1, keepdims=True)[..., None]
  return row[..., :, None] * col[..., None, :] / jnp.where(scale > 0, scale, 1.0)


def flora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    kappa: int | None = 1000,
    seed: int = 0,
    *,
    mask: Any = None,
    second_moment: str = "full",
    first_moment: str = "preconditioned",
    eps_root: float = 0.0,
    weight_decay_mask: Any = None,
    **momentum_options,
) -> optax.GradientTransformation:
  """AdamW whose first moment is kept compressed: ``optax.adamw``'s chain, Flora inside.

  ``scale_by_flora_adam → add_decayed_weights(weight_decay, weight_decay_mask) →
  scale_by_learning_rate``. The second moment is never sketched (a sketch can turn it
  negative): ``second_moment="full"`` keeps Adam's ``nu`` (state ≈ ``(1 + rank/d)/2`` of
  ``optax.adamw``'s), ``"factored"`` keeps Adafactor-style row and column statistics
  (≈ ``rank/d`` of it, plus vectors). ``mask`` chooses the compressed leaves (as in
  :class:`flora_optax.Compression`); with ``mask=False`` this is ``optax.adamw``.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((128, 64)), "b": jnp.zeros(64)}
    >>> tx = flora_optax.flora_adamw(1e-3, rank=16)
    >>> updates, state = tx.update(params, tx.init(params), params)

  Args:
    learning_rate: a float or schedule.
    rank: rank of the first moment's sketch (static int).
    b1, b2, eps, eps_root: as in ``optax.adamw``.
    weight_decay: decoupled weight decay, as in ``optax.adamw``.
    kappa, seed: see :func:`flora_momentum`.
    mask: which leaves to compress (``None``: every matrix whose buffer would shrink).
    second_moment: ``"full"`` or ``"factored"``.
    first_moment: ``"raw"`` or ``"preconditioned"``, see :func:`scale_by_flora_adam`.
    weight_decay_mask: as ``optax.adamw``'s ``mask``.
    **momentum_options: ``transfer``, ``emit``, ``residual_weight`` and the options of
      :class:`flora_optax.Compression`.
  """
  momentum_options = _options.var_keywords(momentum_options, "momentum_options")
  return optax.chain(
      scale_by_flora_adam(rank, b1, b2, eps, eps_root, kappa, seed, mask=mask,
                          second_moment=second_moment, first_moment=first_moment,
                          **momentum_options),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))
