"""Adafactor's factored preconditioner folded into Flora's momentum sketch.

``optax.scale_by_factored_rms`` turns a factored leaf's gradient ``G`` into
``U = diag(a) · G · diag(b)``, with ``a`` and ``b`` from its row and column statistics. When
Flora's momentum comes next (``flora_adafactor``'s default place for it) ``U`` is only ever
read by the down-projection, and a sketch of ``diag(a) G diag(b)`` is a sketch of ``G`` with
the two vectors moved onto the small random matrix and the small buffer. So ``U`` is never
formed: per step, one write and one read of a full-size array fewer (docs/benchmarks.md).

The second-moment statistics are optax's own: its transform updates them, and only the two
scale vectors are derived here from its new state, with its formula. Leaves this does not
cover take optax's ``U`` as before: not compressed, not factored, more than two axes, a
gradient in another dtype than the sketch computes in (bf16 parameters: the matmul would read a
converted copy, a full-size pass that applies the scales at no extra cost), or a sketch whose
``scales_cheaply`` is false (the two-sided sketch: its decompression reads its
random matrices unscaled, and XLA then recomputes the larger draws for each reader, which
cost more than ``U`` saves; benchmarks/cost_model.py measured it).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_optax import _buffers, _layout


def factored_axes(shape, factored: bool, min_dim_size_to_factor) -> tuple[int, int] | None:
  """The axes ``(d1, d0)`` ``optax.scale_by_factored_rms`` factors a leaf of `shape` over
  (the second largest and the largest), or ``None`` where it keeps a full statistic."""
  if not isinstance(factored, (bool, np.bool_)) or not isinstance(min_dim_size_to_factor, int):
    return None  # traced (inject_hyperparams): leave the leaf to optax's own arithmetic
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _scaled(node, grad, v_row, v_col, factored, min_dim_size_to_factor):
  """A :class:`_buffers.Scaled` for a compressed 2-d factored leaf, else ``None``."""
  if not _buffers.is_compressed(node) or not node.sketch.scales_cheaply:
    return None
  if jnp.dtype(grad.dtype) != jnp.dtype(node.sketch.compute_dtype):
    return None  # converting the gradient is a full-size pass anyway, and it scales for free
  leaf = node.leaf
  axes = factored_axes(leaf.shape, factored, min_dim_size_to_factor)
  if axes is None or len(leaf.shape) != 2 or leaf.batch_axes:
    return None
  d1, d0 = axes
  # optax: U = G · (v_row / mean(v_row))^(-1/2) along axis d1 · v_col^(-1/2) along axis d0.
  along = {d1: (v_row / jnp.mean(v_row)) ** -0.5, d0: v_col ** -0.5}
  return _buffers.Scaled(grad, along[leaf.row_axes[0]], along[leaf.col_axes[0]])


def fold_factored_momentum(factored_tx: optax.GradientTransformation, momentum_step: Callable,
                           rest: optax.GradientTransformationExtraArgs, init_fn: Callable, *,
                           factored: bool, min_dim_size_to_factor
                           ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(factored_tx, momentum, *rest)`` with its state, computing the same
  updates without forming ``factored_tx``'s output for the leaves the sketch can scale.

  `init_fn` is that chain's ``init`` (the state is a tuple: factored, momentum, then one
  entry per transform of `rest`).
  """
  def update_fn(updates, state, params=None, **extra_args):
    factored_state, momentum_state, *rest_state = state
    scaled_in, new_factored = factored_tx.update(updates, factored_state, params)
    grads, _ = _layout.unbox(updates)
    v_row, _ = _layout.unbox(new_factored.v_row)
    v_col, _ = _layout.unbox(new_factored.v_col)
    scaled = _buffers.map_leaves(
        lambda node, g, r, c: _scaled(node, g, r, c, factored, min_dim_size_to_factor),
        momentum_state.compressed_mu, grads, v_row, v_col)
    out, new_momentum = momentum_step(scaled_in, momentum_state, scaled)
    out, new_rest = rest.update(out, tuple(rest_state), params, **extra_args)
    return out, (new_factored, new_momentum, *new_rest)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
