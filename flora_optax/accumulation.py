"""Compressed gradient accumulation (Algorithm 1), in place of ``optax.MultiSteps``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_optax import _buffers, _layout, _options

# The accumulator buffers' extra static options (:func:`_buffers.init` and `check`).
SPEC = (("transform", "accumulate"),)


class FloraAccumulateState(NamedTuple):
  """State of :func:`flora_accumulate`.

  Attributes:
    mini_step: micro-steps accumulated in the current cycle (int32 scalar).
    gradient_step: inner-optimizer updates done so far (int32); it is also the cycle number
      that picks the sketch.
    key_data: raw data of the base PRNG key the sketches are regenerated from.
    layout: the format of the buffers (int32: version, sketch, projection, side), so that a
      state saved under other options is refused by name (:func:`flora_optax.check_layout`,
      :func:`flora_optax.restore`), not decoded with the wrong sketch.
    inner_opt_state: state of the wrapped optimizer.
    compressed_acc: running mean of the micro-gradients of this cycle, a tree like the
      parameters (``Compressed`` nodes for compressed leaves, plain arrays for the others).
    skip_state: what ``should_skip_update_fn`` returned last (``()`` without one).
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  key_data: jax.Array
  layout: jax.Array
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
    should_skip_update_fn: optax.transforms.ShouldSkipUpdateFunction | None = None,
    **compression,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps `opt` like ``optax.MultiSteps``, keeping the gradient mean compressed.

  Micro-gradients are averaged over ``k = every_k_schedule(gradient_step)`` micro-steps;
  inner micro-steps emit zero updates and the last one emits ``opt``'s update on the mean.
  For a compressed leaf the running mean lives in a sketch drawn once per cycle:

  .. math::  C \leftarrow C + (\mathrm{sketch}(G_i) - C)/i, \qquad
             \bar G = \mathrm{unsketch}(C) \text{ at the end of the cycle}.

  Sketches are linear, so accumulating ``k`` different gradients equals accumulating ``k``
  copies of their mean; they are new in every cycle, so the inner optimizer's updates are not
  confined to one subspace. With the paper's projection ``E[Ḡ]`` is the mean; with
  ``sketch="two_sided"`` ``Ḡ`` is the mean's rank-``k`` reconstruction (exact for a mean of
  rank ``≤ k``), computed once per cycle. With ``sketch="factors"`` (not a linear sketch)
  the mean is folded into factors ``B A`` at rate ``1/i``, ``A`` kept from the last cycle as
  a warm start; what lies outside the subspace one Newton step per micro-step reaches is
  lost. Leaves that are not compressed keep ``optax.MultiSteps``' exact running mean.

  Default (0.2): ``sketch="two_sided"``, the seed-keyed sketch with the lowest worst-task
  loss at rank d/4 in the quality suite (``docs/benchmarks.md``); the paper's method, and
  0.1's default, is ``sketch="projection", projection="gaussian"`` (a state written before
  0.2.0 is read only with those, see :func:`flora_optax.restore`). Giving ``projection`` or ``side``
  alone selects ``sketch="projection"``.

  The inner optimizer only runs on the last micro-step of a cycle (under ``lax.cond``). A
  schedule that lowers ``k`` mid-cycle emits on the next micro-step, as ``MultiSteps`` does.

  Non-finite gradients: without ``should_skip_update_fn`` a NaN propagates into the
  accumulator, as in ``optax.MultiSteps``. Pass ``should_skip_update_fn=optax.skip_not_finite``
  to drop such micro-batches: the state is then left exactly as it was and zeros are emitted.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = flora_optax.flora_accumulate(optax.sgd(0.1), every_k_schedule=4, rank=8)
    >>> state = tx.init(params)
    >>> sorted(state.compressed_acc["w"].parts)     # the two-sided sketch
    ['corange', 'range']
    >>> for _ in range(4):
    ...   updates, state = tx.update(params, state, params)
    >>> int(state.gradient_step)
    1

  Args:
    opt: the wrapped optimizer (any ``GradientTransformation``; extra args are passed on).
    every_k_schedule: micro-steps per update: an int ``>= 1`` or a function of the
      gradient step returning an integer ``>= 1``.
    rank: a compressed leaf keeps about ``rank × max(n, m)`` numbers (static int).
    seed: seed of the sketches, used for nothing else.
    should_skip_update_fn: as in ``optax.MultiSteps``: ``(updates, gradient_step, params)
      -> (bool scalar, skip_state)``; a skipped micro-step leaves the state unchanged.
    **compression: the options of :class:`flora_optax.Compression`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`FloraAccumulateState`.
  """
  options = _options.compression_from(compression, rank, "accumulation")
  layout = _options.layout_code(options)
  seed = _options.check_seed(seed)
  every_k = _schedule(every_k_schedule)
  inner = optax.with_extra_args_support(opt)
  skip_fn = should_skip_update_fn or _no_skip
  compute, impl = options.compute_dtype, options.prng_impl

  def init_fn(params):
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = skip_fn(optax.tree.zeros_like(params), gradient_step, params)
    key_data = _options.base_key_data(seed, _options.DOMAIN_ACCUMULATE, impl)
    return FloraAccumulateState(
        mini_step=jnp.zeros([], jnp.int32), gradient_step=gradient_step, key_data=key_data,
        layout=jnp.asarray(layout, jnp.int32), inner_opt_state=inner.init(params),
        compressed_acc=_buffers.init(params, options, SPEC,
                                     key_data=key_data),
        skip_state=skip_state)

  def update_fn(updates, state, params=None, **extra_args):
    boxed = updates
    updates, rebox = _layout.unbox(updates)
    _options.check_layout_value(state.layout, layout, "flora_accumulate")
    _buffers.check(updates, state.compressed_acc, "accumulator", options, SPEC)
    k = every_k(state.gradient_step)
    should_skip, skip_state = _checked_skip(skip_fn(updates, state.gradient_step, params))

    def zero_updates(inner_state):  # what the inner optimizer would emit, as zeros
      return optax.tree.zeros_like(jax.eval_shape(
          lambda s: inner.update(boxed, s, params, **extra_args)[0], inner_state))

    def accumulate(updates, state, params):
      acc = _buffers.to_compute(state.compressed_acc, compute)
      draws = _buffers.draw(acc, state.key_data, state.gradient_step, impl)
      # Welford's running mean, as optax.MultiSteps.
      acc = _buffers.fold(acc, updates, draws, compute, rate=1 / (state.mini_step + 1),
                          mix=lambda a, c: a + (c - a) / (state.mini_step + 1))
      emit = state.mini_step >= k - 1

      def finish(acc, inner_state):
        mean = rebox(optax.tree.cast_like(_buffers.decompress(acc, draws), updates))
        out, inner_state = inner.update(mean, inner_state, params, **extra_args)
        return out, inner_state, _buffers.reset(acc)

      out, inner_state, acc = jax.lax.cond(
          emit, finish, lambda acc, s: (zero_updates(s), s, acc), acc, state.inner_opt_state)
      return out, FloraAccumulateState(
          mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
          gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step),
                                  state.gradient_step),
          key_data=state.key_data, layout=state.layout, inner_opt_state=inner_state,
          compressed_acc=_buffers.store(acc, state.compressed_acc, state.key_data, impl,
                                        state.gradient_step, state.mini_step),
          skip_state=skip_state)

    if should_skip_update_fn is None:
      return accumulate(updates, state, params)
    return jax.lax.cond(
        should_skip,
        lambda u, s, p: (zero_updates(s.inner_opt_state), s._replace(skip_state=skip_state)),
        accumulate, updates, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _checked_skip(result):
  should_skip, skip_state = result
  should_skip = jnp.asarray(should_skip)
  if should_skip.shape != () or should_skip.dtype != jnp.bool_:
    raise ValueError(f"should_skip_update_fn must return a bool scalar, got dtype "
                     f"{should_skip.dtype} and shape {should_skip.shape}")
  return should_skip, skip_state


def _schedule(every_k_schedule) -> Callable[[jax.Array], jax.Array]:
  """`every_k_schedule` as a function returning an int32 ``k >= 1``, checked where it can be."""
  if not callable(every_k_schedule):
    k = _options.check_count(every_k_schedule, "every_k_schedule")
    return lambda step: jnp.asarray(k, jnp.int32)

  def checked(step):
    k = jnp.asarray(every_k_schedule(step))
    if k.shape != () or not jnp.issubdtype(k.dtype, jnp.integer):
      raise TypeError(f"every_k_schedule must return an integer scalar, got dtype {k.dtype} "
                      f"and shape {k.shape}")
    if not isinstance(k, jax.core.Tracer):
      if not 1 <= int(k) < 2**31:
        raise ValueError(f"every_k_schedule returned {int(k)}; it must be in [1, 2**31)")
    else:
      jax.debug.callback(_check_k_at_run_time, k)
    return k.astype(jnp.int32)
  return checked


def _check_k_at_run_time(k):
  if int(np.asarray(k)) < 1:
    raise ValueError(f"every_k_schedule returned {int(np.asarray(k))} under jit; it must be "
                     f">= 1")


def has_updated(state: Any) -> jax.Array:
  """True right after a micro-step on which the inner optimizer ran (like ``MultiSteps``).

  Accepts a :class:`FloraAccumulateState` or any state that holds exactly one (a chain, an
  ``inject_hyperparams`` state).
  """
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, FloraAccumulateState)) if isinstance(s, FloraAccumulateState)]
  if len(found) != 1:
    raise ValueError(f"has_updated needs a state holding exactly one FloraAccumulateState, "
                     f"found {len(found)}")
  return jnp.logical_and(found[0].mini_step == 0, found[0].gradient_step > 0)


def _deprecated_accumulate(chain, accumulate_every, rank, seed, should_skip_update_fn,
                           compression):
  warnings.warn("flora_adafactor(accumulate_every=k) is deprecated; wrap the optimizer: "
                "flora_accumulate(flora_adafactor(...), k, rank)", DeprecationWarning,
                stacklevel=3)
  return flora_accumulate(chain, accumulate_every, rank, seed,
                          should_skip_update_fn=should_skip_update_fn, **compression)
