"""A full-size exponential moving average stored in 8 bits: ``optax.ema`` with int8 blocks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _buffers, _layout, _options


class Int8EmaState(NamedTuple):
  """State of :func:`int8_ema`.

  Attributes:
    count: updates seen so far (int32, saturating like optax's counters), for the debiasing.
    key_data: raw data of the PRNG key of the stochastic rounding (nothing else uses it).
    ema: a tree like the parameters: an :class:`flora_optax.Int8Blocks` (int8 codes and
      float32 block scales) for every real floating leaf with at least one axis, a float32
      array for scalars and a float32 (complex: complex) array for the other leaves.
  """

  count: jax.Array
  key_data: jax.Array
  ema: Any


def int8_ema(decay: float | jax.Array, debias: bool = True, seed: int = 0
             ) -> optax.GradientTransformation:
  r"""``optax.ema`` whose buffer is stored in int8 with float32 block scales (8-bit Adam's
  momentum format, Dettmers et al. 2022).

  .. math::  m \leftarrow Q_\xi\big(\beta\, \hat m + (1-\beta)\, g\big), \qquad
             \text{emit } m / (1 - \beta^t) \ (\text{debias}) \text{ or } m,

  computed in float32 from the dequantized ``m̂`` and quantized again (:class:`Int8Blocks`:
  absmax blocks of 256 entries along each leaf's last axis) with stochastic rounding ``Q_ξ``
  from bits derived from ``seed`` and the step. The stored EMA is unbiased and within one
  quantization step of the float32 one per entry and step; round-to-nearest would stall an
  EMA whose increments are below half a step (``tests/test_int8.py`` shows both). The emitted
  value is the float32 EMA of this step (before it is stored), so one step's quantization
  reaches the output only through the next steps.

  State: 1 byte per entry plus 4 bytes per block of 256 (``≈ 0.254×`` optax's float32
  ``ema``). Equal to ``flora_momentum(rank, decay, mask=False, dtype="int8",
  plain_dtype="int8")`` without the sketch machinery, plus ``debias``.

  Non-finite updates poison only their own block of 256 entries (it reads back as NaN); wrap
  the chain in ``optax.apply_if_finite`` to skip such steps. For ``optax.trace``'s
  ``t ← g + β t`` use ``int8_ema(β, debias=False)`` and scale by ``1/(1 - β)``
  (``optax.scale``): the same buffer up to that constant.

  Example:
    >>> import jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((64, 512)), "b": jnp.zeros(())}
    >>> tx = optax.chain(flora_optax.int8_ema(0.9), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> state[0].ema["w"].q.dtype, state[0].ema["w"].scale.shape, state[0].ema["b"].dtype
    (dtype('int8'), (64, 2), dtype('float32'))
    >>> updates, state = tx.update(params, state, params)

  Args:
    decay: ``β`` in ``[0, 1)``; may be traced (``optax.inject_hyperparams``).
    debias: divide by ``1 - β^t`` as ``optax.ema`` does (default True, as there).
    seed: seed of the rounding bits.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`Int8EmaState`.

  References:
    Dettmers, Lewis, Shleifer, Zettlemoyer, `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  _options.check_decay(decay)
  seed = _options.check_seed(seed)
  # rank is unused with mask=False: every leaf keeps a plain (full-size) buffer.
  options = _options.Compression(rank=1, mask=False, dtype="int8", plain_dtype="int8")
  impl = options.prng_impl

  def init_fn(params):
    return Int8EmaState(
        count=jnp.zeros([], jnp.int32),
        key_data=_options.base_key_data(seed, _options.DOMAIN_EMA, impl),
        ema=_buffers.init(params, options, (("transform", "ema"),)))

  def update_fn(updates, state, params=None):
    del params
    updates, rebox = _layout.unbox(updates)
    _buffers.check(updates, state.ema, "int8_ema")
    ema = _buffers.to_compute(state.ema, jnp.float32)
    new = jax.tree.map(lambda m, g: (1 - decay) * g + decay * m, ema, updates)
    count = optax.safe_increment(state.count)
    out = optax.tree.bias_correction(new, decay, count) if debias else new
    return rebox(optax.tree.cast_like(out, updates)), Int8EmaState(
        count=count, key_data=state.key_data,
        ema=_buffers.store(new, state.ema, state.key_data, impl, state.count))

  return optax.GradientTransformation(init_fn, update_fn)
