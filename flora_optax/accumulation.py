"""Compressed gradient accumulation (Algorithm 1) and a compressed microbatching accumulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _compression as comp


class FloraAccumulateState(NamedTuple):
  """State of :func:`flora_accumulate`.

  Attributes:
    mini_step: micro-steps accumulated in the current cycle (int32 scalar).
    gradient_step: inner-optimizer updates done so far (int32); it is also the cycle number
      that picks the projection.
    key_data: raw data of the base PRNG key the projections are regenerated from.
    inner_opt_state: state of the wrapped optimizer.
    compressed_acc: running mean of the micro-gradients of this cycle: compressed leaves
      have shape ``(*batch, n, rank)`` or ``(*batch, rank, m)``, the others their own shape.
    skip_state: what ``should_skip_update_fn`` returned last (``()`` without one).
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  key_data: jax.Array
  inner_opt_state: Any
  compressed_acc: Any
  skip_state: Any = ()


def _no_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.array(False), ()


def flora_accumulate(
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    rank: int,
    seed: int = 0,
    *,
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    projection: str = "gaussian",
    dtype: Any = "float32",
    precision: Any = None,
    prng_impl: str = "threefry2x32",
    should_skip_update_fn: optax.transforms.ShouldSkipUpdateFunction | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps `opt` like ``optax.MultiSteps``, keeping the gradient mean compressed.

  Micro-gradients are averaged over ``k = every_k_schedule(gradient_step)`` micro-steps;
  inner micro-steps emit zero updates and the last one emits ``opt``'s update on the mean.
  For a compressed leaf the running mean lives in a random ``rank``-dimensional subspace:

  .. math::  C \leftarrow C + (G_i A^\top - C)/i, \qquad
             \bar G = C A \text{ at the end of the cycle}, \qquad E[\bar G] = \tfrac1k\sum_i G_i.

  ``A`` is the same for all micro-steps of a cycle (so accumulating ``k`` different
  gradients equals accumulating ``k`` copies of their mean) and new in every cycle, so the
  inner optimizer's updates are not confined to one subspace. Leaves that are not
  compressed keep ``optax.MultiSteps``' exact running mean.

  The inner optimizer only runs on the last micro-step of a cycle (under ``lax.cond``),
  where ``optax.MultiSteps`` computes and discards it on every micro-step.

  Non-finite gradients: without ``should_skip_update_fn`` a NaN propagates into the
  accumulator (as in ``optax.MultiSteps``) and spreads to the whole row/column of the
  compressed leaf. Pass ``should_skip_update_fn=optax.skip_not_finite`` to drop such
  micro-batches: the state is then left exactly as it was and zeros are emitted.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = flora_optax.flora_accumulate(optax.sgd(0.1), every_k_schedule=4, rank=8)
    >>> state = tx.init(params)
    >>> state.compressed_acc["w"].shape
    (64, 8)
    >>> for _ in range(4):
    ...   updates, state = tx.update(params, state, params)
    >>> int(state.gradient_step)
    1

  Args:
    opt: the wrapped optimizer (any ``GradientTransformation``; extra args are passed on).
    every_k_schedule: micro-steps per update: an int ``>= 1`` or a function of the
      gradient step returning one.
    rank: rank of the projection (static int).
    seed: seed of the projections, used for nothing else.
    mask, axes, side, projection, dtype, precision, prng_impl: as in
      :func:`flora_momentum`.
    should_skip_update_fn: as in ``optax.MultiSteps``: ``(updates, gradient_step, params)
      -> (bool scalar, skip_state)``; a skipped micro-step leaves the state unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`FloraAccumulateState`.

  References:
    Hao, Cao, Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  compressor = comp.Compressor(
      rank=rank, domain=comp.DOMAIN_ACCUMULATE, mask=mask, axes=axes, side=side,
      projection=projection, dtype=dtype, precision=precision, prng_impl=prng_impl)
  if callable(every_k_schedule):
    every_k = every_k_schedule
  elif isinstance(every_k_schedule, int) and not isinstance(every_k_schedule, bool):
    if every_k_schedule < 1:
      raise ValueError(f"every_k_schedule must be >= 1, got every_k_schedule={every_k_schedule}")
    every_k = lambda step: every_k_schedule  # noqa: E731
  else:
    raise TypeError(
        f"every_k_schedule must be an int or a function of the gradient step, got "
        f"{every_k_schedule!r}")
  inner = optax.with_extra_args_support(opt)
  skip_fn = should_skip_update_fn or _no_skip
  key_data = compressor.base_key_data(seed)

  def init_fn(params):
    plans = compressor.plan(params)
    buffers = [jnp.zeros(p.state_shape, compressor.dtype) for p in plans]
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = skip_fn(optax.tree.zeros_like(params), gradient_step, params)
    return FloraAccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        key_data=key_data,
        inner_opt_state=inner.init(params),
        compressed_acc=jax.tree.unflatten(jax.tree.structure(params), buffers),
        skip_state=skip_state)

  def update_fn(updates, state, params=None, **extra_args):
    plans = compressor.plan(updates)
    comp.check_tree_matches(plans, updates, state.compressed_acc, "accumulator")
    treedef = jax.tree.structure(updates)
    k = every_k(state.gradient_step)
    k_concrete = comp.concrete_float(k)
    if k_concrete is not None and k_concrete < 1:
      raise ValueError(f"every_k_schedule returned {k_concrete} at gradient step "
                       f"{state.gradient_step}; it must be >= 1")
    # A traced k below 1 cannot raise inside jit: treat it as 1 (emit every micro-step).
    k = jnp.maximum(jnp.asarray(k, jnp.int32), 1)
    should_skip, skip_state = skip_fn(updates, state.gradient_step, params)
    should_skip = jnp.asarray(should_skip)
    if should_skip.shape != () or should_skip.dtype != jnp.bool_:
      raise ValueError(
          f"should_skip_update_fn must return a bool scalar, got dtype {should_skip.dtype} "
          f"and shape {should_skip.shape}")

    def accumulate(updates, state, params):
      projections = compressor.projection_matrices(state.key_data, plans, state.gradient_step)
      n_acc = state.mini_step
      new_acc = []
      for plan, g, acc, a in zip(plans, jax.tree.leaves(updates),
                                 jax.tree.leaves(state.compressed_acc), projections):
        g_c = compressor.down(g, a, plan) if plan.compressed else g
        acc = acc.astype(compressor.compute_dtype)
        # Welford's running mean, as optax.MultiSteps does.
        # (A bf16 buffer is rounded stochastically, with new bits every micro-step.)
        new_acc.append(compressor.store(acc + (g_c - acc) / (n_acc + 1), state.key_data,
                                        plan.index, state.gradient_step, state.mini_step))
      emit = state.mini_step == k - 1

      def finish(new_acc, inner_state):
        mean = [compressor.up(c, a, p) if p.compressed else c
                for p, c, a in zip(plans, new_acc, projections)]
        mean = optax.tree.cast_like(jax.tree.unflatten(treedef, mean), updates)
        out, inner_state = inner.update(mean, inner_state, params, **extra_args)
        zeros = [jnp.zeros_like(c) for c in new_acc]
        return out, inner_state, zeros

      def wait(new_acc, inner_state):
        out_shape = jax.eval_shape(lambda s: inner.update(updates, s, params, **extra_args)[0],
                                   inner_state)
        return optax.tree.zeros_like(out_shape), inner_state, new_acc

      out, inner_state, new_acc = jax.lax.cond(
          emit, finish, wait, new_acc, state.inner_opt_state)
      new_state = FloraAccumulateState(
          mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
          gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step),
                                  state.gradient_step),
          key_data=state.key_data,
          inner_opt_state=inner_state,
          compressed_acc=jax.tree.unflatten(treedef, new_acc),
          skip_state=skip_state)
      return out, new_state

    if should_skip_update_fn is None:
      return accumulate(updates, state, params)

    def skip(updates, state, params):
      out_shape = jax.eval_shape(
          lambda s: inner.update(updates, s, params, **extra_args)[0], state.inner_opt_state)
      return optax.tree.zeros_like(out_shape), state._replace(skip_state=skip_state)

    return jax.lax.cond(should_skip, skip, accumulate, updates, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def has_updated(state: FloraAccumulateState) -> jax.Array:
  """True right after a micro-step on which the inner optimizer ran (like ``MultiSteps``)."""
  return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)


def compressed_mean(
    rank: int,
    cycle: jax.typing.ArrayLike,
    seed: int = 0,
    *,
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    projection: str = "gaussian",
    dtype: Any = "float32",
    precision: Any = None,
    prng_impl: str = "threefry2x32",
) -> optax.microbatching.Accumulator:
  """A compressed running-mean ``optax.microbatching.Accumulator`` for gradient trees.

  Use it as the ``accumulator`` of ``optax.microbatching.microbatch`` (for the gradient
  part of the output) to average micro-batch gradients inside one jitted step while only
  a ``rank``-dimensional sketch of each matrix is carried through the loop. All micro-batches
  of a call share the projection of ``cycle``; pass the optimizer step as ``cycle`` so each
  step draws a fresh one. The result is an unbiased estimate of the mean gradient.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flora_optax
    >>> w = jnp.ones((32, 16)); x = jnp.ones((8, 32))
    >>> grad_fn = jax.grad(lambda w, x: jnp.sum(x @ w))
    >>> acc = flora_optax.compressed_mean(rank=4, cycle=0)
    >>> g = optax.microbatching.microbatch(grad_fn, argnums=1, microbatch_size=2,
    ...                                    accumulator=acc)(w, x)
    >>> g.shape
    (32, 16)

  Args:
    rank: rank of the projection (static int).
    cycle: integer (may be traced) selecting the projection.
    seed, mask, axes, side, projection, dtype, precision, prng_impl: as in
      :func:`flora_accumulate`.
  """
  compressor = comp.Compressor(
      rank=rank, domain=comp.DOMAIN_MICROBATCH, mask=mask, axes=axes, side=side,
      projection=projection, dtype=dtype, precision=precision, prng_impl=prng_impl)
  key_data = compressor.base_key_data(seed)

  def projections(plans):
    return compressor.projection_matrices(key_data, plans, cycle)

  # `finalize` sees only the compressed carry, not the leaves' own shapes: `init` records
  # the plans (static shape information) for it.
  recorded = {}

  def init(value_struct):
    plans = recorded["plans"] = compressor.plan(value_struct)
    for p in plans:
      dt = jax.tree.leaves(value_struct)[p.index].dtype
      if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"compressed_mean needs floating values, {p.name} is {dt}")
    return jax.tree.unflatten(jax.tree.structure(value_struct),
                              [jnp.zeros(p.state_shape, compressor.dtype) for p in plans])

  def update(carry, value, index):
    plans = compressor.plan(value)
    out = []
    for p, c, v, a in zip(plans, jax.tree.leaves(carry), jax.tree.leaves(value),
                          projections(plans)):
      v_c = compressor.down(v, a, p) if p.compressed else v.astype(compressor.compute_dtype)
      c = c.astype(compressor.compute_dtype)
      # Stored like every Flora buffer (bf16: stochastic rounding, new bits per micro-batch),
      # which also keeps the loop carry in its storage dtype.
      out.append(compressor.store(c + (v_c - c) / (index + 1), key_data, p.index, cycle, index))
    return jax.tree.unflatten(jax.tree.structure(value), out)

  def finalize(carry):
    plans = recorded["plans"]
    out = [compressor.up(c, a, p) if p.compressed else c
           for p, c, a in zip(plans, jax.tree.leaves(carry), projections(plans))]
    return jax.tree.unflatten(jax.tree.structure(carry), out)

  def aggregate(values):
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), values)

  return optax.microbatching.Accumulator(init, update, finalize, aggregate)
