"""A compressed running-mean accumulator for ``optax.microbatching``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flora_optax import _buffers, _layout, _options, _sketches

# The carry's extra static options (:func:`_buffers.init` and `check`).
SPEC = (("transform", "microbatch"),)


def compressed_mean(
    rank: int,
    cycle: jax.typing.ArrayLike,
    seed: int = 0,
    **compression,
) -> optax.microbatching.Accumulator:
  """A compressed running-mean ``optax.microbatching.Accumulator`` for gradient trees.

  Use it as the ``accumulator`` of ``optax.microbatching.microbatch`` to average micro-batch
  gradients inside one jitted step while only a sketch of each matrix is carried through the
  loop. All micro-batches of a call share the sketch of ``cycle``; pass the optimizer step as
  ``cycle`` so each step draws a fresh one. With the paper's projection the result is an
  unbiased estimate of the mean gradient; with ``sketch="two_sided"`` it is the mean's
  rank-``k`` reconstruction. Leaves that are not compressed are averaged exactly in their own
  dtype, as optax's ``MEAN`` does, and the result has the values' dtypes.

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
    rank: a compressed leaf keeps about ``rank × max(n, m)`` numbers (static int).
    cycle: integer (may be traced) selecting the sketch.
    seed: seed of the sketches, used for nothing else.
    **compression: the options of :class:`flora_optax.Compression`.
  """
  options = _options.compression_from(compression, rank, "accumulation")
  if not _sketches.make_sketch(options).linear:
    raise ValueError(f"compressed_mean needs a linear sketch (optax.microbatching averages "
                     f"accumulators computed in parallel); sketch={options.sketch!r} is not "
                     f"one: use sketch='projection' or 'two_sided', or flora_accumulate")
  seed = _options.check_seed(seed)
  compute, impl = options.compute_dtype, options.prng_impl
  key_data = _options.base_key_data(seed, _options.DOMAIN_MICROBATCH, impl)

  def init(value_struct):
    for name, leaf in zip(_layout.leaf_names(value_struct), jax.tree.leaves(value_struct)):
      if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        raise TypeError(f"compressed_mean needs floating values, {name} {leaf.shape} is "
                        f"{leaf.dtype}")
    return _buffers.init(value_struct, options, SPEC,
                         plain_dtype=lambda leaf: leaf.dtype)

  def update(carry, value, index):
    _buffers.check(value, carry, "compressed_mean", options, SPEC)
    mean = _buffers.to_compute(carry, compute)
    draws = _buffers.draw(mean, key_data, cycle, impl)
    mean = jax.tree.map(lambda c, v: c + (v - c) / (index + 1), mean,
                        _buffers.compress(mean, value, draws, compute))
    return _buffers.store(mean, carry, key_data, impl, cycle, index)

  def finalize(carry):
    draws = _buffers.draw(carry, key_data, cycle, impl)
    full = _buffers.decompress(_buffers.to_compute(carry, compute), draws)
    return _buffers.map_leaves(
        lambda buf, x: x.astype(buf.leaf.dtype if _buffers.is_compressed(buf) else buf.dtype),
        carry, full)

  def aggregate(values):
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), values)

  return optax.microbatching.Accumulator(init, update, finalize, aggregate)
