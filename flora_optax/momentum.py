"""Compressed momentum: an exponential moving average kept in a random subspace (Algorithm 2)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _compression as comp

TRANSFERS = ("auto", "unbiased", "least_squares")
# transfer="auto" keeps the paper's unbiased transfer for a leaf only while its noise is damped
# with margin: each transfer multiplies the carried state by ≈ sqrt(d/rank) and the decay
# shrinks it by decay**kappa in between, so the noise stays bounded iff the product is < 1
# (FLORA.md); at 1/2 its variance is amplified by at most 1/(1 - 1/4) = 4/3.
AUTO_UNBIASED_BELOW = 0.5
EMITS = ("compressed", "exact_gradient")


class FloraMomentumState(NamedTuple):
  """State of :func:`flora_momentum`.

  Attributes:
    count: number of updates seen so far (int32 scalar). The projection in use at step
      ``count`` belongs to cycle ``count // kappa``.
    key_data: raw data of the base PRNG key (``uint32[2]`` for threefry). Projections are
      regenerated from it; it survives checkpoints and resharding.
    compressed_mu: the momentum per leaf: shape ``(*batch, n, rank)`` or
      ``(*batch, rank, m)`` for compressed leaves, the leaf's own shape for the others.
  """

  count: jax.Array
  key_data: jax.Array
  compressed_mu: Any


def flora_momentum(
    rank: int,
    decay: float | jax.Array = 0.9,
    kappa: int | None = 1000,
    seed: int = 0,
    *,
    mask: Any = None,
    axes: Any = None,
    side: str = "smaller",
    projection: str = "gaussian",
    transfer: str = "least_squares",
    emit: str = "compressed",
    dtype: Any = "float32",
    precision: Any = None,
    prng_impl: str = "threefry2x32",
) -> optax.GradientTransformation:
  r"""An EMA of the updates, like ``optax.ema(decay, debias=False)``, with compressed buffers.

  For every compressed leaf (a matrix ``G`` of shape ``(n, m)``, or a batch of them) the
  momentum is kept as ``M = (EMA of G) Aᵀ`` of shape ``(n, rank)`` instead of ``(n, m)``, where
  ``A`` is a random ``(rank, m)`` projection with ``E[AᵀA] = I`` regenerated from a PRNG key
  (never stored). Each step

  .. math::  M \leftarrow \beta M + (1-\beta)\, G A^\top, \qquad
             \text{emit } M A \quad (\text{so } E[MA] = \text{the EMA}).

  Every ``kappa`` steps ``A`` is resampled and the momentum is carried over to the new
  subspace, computed through ``rank × rank`` matrices (never a full-size one):

  * ``transfer="least_squares"`` (default) stores the least-squares fit of the old
    decompressed momentum in the new subspace, ``M ← M A_old A_newᵀ (A_new A_newᵀ)⁻¹``: a
    projection, so the state never grows, but it keeps only ≈ ``rank/d`` of the history;
  * ``transfer="unbiased"`` is the paper's up-with-the-old, down-with-the-new
    ``M ← M A_old A_newᵀ``: unbiased, but each transfer multiplies the carried state by
    ≈ ``sqrt(d/rank)`` of pure noise, which diverges unless ``decay**kappa * sqrt(d/rank) < 1``;
  * ``transfer="auto"`` uses the unbiased transfer for a leaf where it is stable with margin,
    ``decay**kappa * sqrt(d/rank) < 1/2``, and least squares elsewhere.

  Measured: on the Shakespeare language model of ``docs/benchmarks.md`` (rank 16 of 64,
  ``kappa=20``, 3 seeds) least squares reached a validation loss 1.9% lower than the unbiased
  transfer (about 6 standard errors), although ``"auto"`` would pick the unbiased one there;
  at ``kappa=100`` the three coincide (the carried history has decayed to nothing). On a
  deterministic least-squares problem (``notebooks/03_rank_and_kappa.ipynb``) the unbiased
  transfer diverged at rank 4 and 16 of 128 with ``kappa=10`` and won at rank 64, where
  ``"auto"`` follows the better of the two.

  Resampling is what lets the sum of updates leave a single rank-``r`` subspace; between
  resamples every update lies in one (as with a LoRA adapter), so ``kappa`` should be small
  enough that a run sees many resamples: the paper's 1000 suits long runs only.

  Leaves that are not compressed (vectors, scalars, masked-out leaves, leaves whose
  compressed buffer would not be smaller) keep a plain EMA with exactly ``optax.ema``'s
  arithmetic.

  .. warning::
    Decompression inflates: ``‖M A‖ ≈ sqrt(d/rank)·‖EMA‖``. Put a normalising step after it
    (``optax.clip_by_block_rms``, as :func:`flora_adafactor` does) or lower the learning rate.

  Non-finite updates propagate into the state exactly as with ``optax.ema``: a NaN in one
  entry of ``G`` spreads to its whole row (or column) of ``M``. Wrap the chain in
  ``optax.apply_if_finite`` to skip such steps.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax.chain(flora_optax.flora_momentum(rank=8, decay=0.9, kappa=100),
    ...                  optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> state[0].compressed_mu["w"].shape, state[0].compressed_mu["b"].shape
    ((64, 8), (32,))
    >>> updates, state = tx.update(params, state, params)

  Args:
    rank: rank of the projection (static int). Leaves whose compressed side is not larger
      than ``rank`` stay uncompressed unless ``mask`` asks for them (then it is an error).
    decay: EMA decay ``β`` in ``[0, 1)``; may be a traced array (``inject_hyperparams``).
    kappa: resample the projection every ``kappa`` steps (paper: 1000); ``None`` keeps one
      projection forever (a fixed random subspace, like a frozen LoRA ``A``).
    seed: seed of the projections. It is used for nothing else, and projections of
      momentum and of accumulation never coincide.
    mask: which leaves to compress: ``None`` (every floating leaf with at least 2 axes whose
      buffer would shrink), a pytree (prefix) of bools, or a callable ``params -> tree``.
    axes: how leaves are viewed as matrices: ``None`` (2-D as is; more axes: all but the last
      are rows), a :class:`MatrixAxes`, a pytree (prefix) of them (``None`` entries take the
      default), or a callable ``params -> tree``.
    side: compressed side of each matrix: ``"smaller"`` (default, cheapest for the same
      noise), ``"larger"``, ``"rows"`` or ``"cols"``.
    projection: ``"gaussian"`` (the paper's), ``"orthogonal"`` (Haar, lower noise, one QR per
      leaf and step) or ``"rademacher"``.
    transfer: ``"least_squares"`` (default), ``"unbiased"`` or ``"auto"``, see above.
    emit: ``"compressed"`` emits ``up(M_t)`` (Algorithm 2); ``"exact_gradient"`` emits
      ``β·up(M_{t-1}) + (1-β)·G_t``: the current update exact, only the history compressed.
    dtype: storage dtype of the momentum buffers (default float32). Arithmetic and
      projections always run in float32 at least; ``"bfloat16"`` buffers are rounded
      stochastically, which keeps the EMA unbiased (measured: within 0.3% of the float32 EMA,
      where round-to-nearest settles 3.9% short; ``tests/test_momentum.py``).
    precision: ``jax.lax.Precision`` of the projection matmuls (``None``: JAX's default).
    prng_impl: ``"threefry2x32"`` (default; same numbers under any sharding) or the faster
      ``"rbg"``/``"unsafe_rbg"``, whose numbers may change with sharding and JAX version.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`FloraMomentumState`.

  References:
    Hao, Cao, Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  compressor = comp.Compressor(
      rank=rank, domain=comp.DOMAIN_MOMENTUM, mask=mask, axes=axes, side=side,
      projection=projection, dtype=dtype, precision=precision, prng_impl=prng_impl)
  comp.check_decay(decay)
  if kappa is not None and (isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1):
    raise ValueError(f"kappa must be a positive int or None, got kappa={kappa!r}")
  if transfer not in TRANSFERS:
    raise ValueError(f"transfer must be one of {TRANSFERS}, got transfer={transfer!r}")
  if emit not in EMITS:
    raise ValueError(f"emit must be one of {EMITS}, got emit={emit!r}")
  key_data = compressor.base_key_data(seed)

  def init_fn(params):
    plans = compressor.plan(params)
    buffers = [jnp.zeros(p.state_shape, compressor.dtype) for p in plans]
    return FloraMomentumState(
        count=jnp.zeros([], jnp.int32),
        key_data=key_data,
        compressed_mu=jax.tree.unflatten(jax.tree.structure(params), buffers))

  def update_fn(updates, state, params=None):
    del params
    plans = compressor.plan(updates)
    comp.check_tree_matches(plans, updates, state.compressed_mu, "momentum")
    treedef = jax.tree.structure(updates)
    grads = jax.tree.leaves(updates)
    mus = jax.tree.leaves(state.compressed_mu)
    compute = compressor.compute_dtype
    decay_ = jnp.asarray(decay, compute)

    if kappa is None:
      cycle = jnp.zeros([], jnp.int32)
    else:
      cycle = state.count // kappa
    projections = compressor.projection_matrices(state.key_data, plans, cycle)

    if kappa is not None and any(p.compressed for p in plans):
      resample = jnp.logical_and(state.count > 0, state.count % kappa == 0)
      mus = jax.lax.cond(
          resample,
          lambda ms: _transfer_all(compressor, plans, ms, projections, state.key_data,
                                   cycle - 1, transfer, decay, kappa),
          lambda ms: list(ms),
          mus)

    outs, new_mus = [], []
    for plan, g, mu, a in zip(plans, grads, mus, projections):
      if mu.dtype != compute:
        mu = mu.astype(compute)
      if not plan.compressed:
        # Same arithmetic as optax.ema(decay, debias=False).
        new_mu = (1 - decay) * g + decay * mu
        out = new_mu
      else:
        new_mu = decay_ * mu + (1 - decay_) * compressor.down(g, a, plan)
        if emit == "compressed":
          out = compressor.up(new_mu, a, plan)
        else:
          out = decay_ * compressor.up(mu, a, plan) + (1 - decay_) * g.astype(compute)
      outs.append(out.astype(g.dtype))
      new_mus.append(compressor.store(new_mu, state.key_data, plan.index, state.count))

    new_state = FloraMomentumState(
        count=optax.safe_increment(state.count),
        key_data=state.key_data,
        compressed_mu=jax.tree.unflatten(treedef, new_mus))
    return jax.tree.unflatten(treedef, outs), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _transfer_all(compressor, plans, mus, new_projections, key_data, old_cycle, transfer,
                  decay, kappa):
  """Moves every compressed buffer from the old cycle's subspace to the new one's."""
  old_projections = compressor.projection_matrices(key_data, plans, old_cycle)
  return [
      transfer_buffer(compressor, plan, mu, a_old, a_new,
                      resolve_transfer(transfer, decay, kappa, plan.dim, plan.rank))
      if plan.compressed else mu
      for plan, mu, a_old, a_new in zip(plans, mus, old_projections, new_projections)]


def resolve_transfer(transfer, decay, kappa, dim, rank):
  """The transfer a leaf uses: ``transfer`` itself, or for ``"auto"`` the unbiased one where
  ``decay**kappa * sqrt(dim/rank) < 1/2`` and least squares elsewhere. With a traced decay
  the answer is a traced bool (True: unbiased)."""
  if transfer != "auto":
    return transfer
  growth = math.sqrt(dim / rank)
  value = comp.concrete_float(decay)
  if value is not None:
    return "unbiased" if value**kappa * growth < AUTO_UNBIASED_BELOW else "least_squares"
  return jnp.asarray(decay, jnp.float32) ** kappa * growth < AUTO_UNBIASED_BELOW


def transfer_buffer(compressor, plan, mu, a_old, a_new, transfer="least_squares"):
  """Carries a compressed buffer from projection `a_old` to `a_new` (both ``(*b, r, d)``).

  ``unbiased``: ``up(mu, a_old)`` compressed with ``a_new``. It is computed through the
  ``(r, r)`` matrix ``a_new a_oldᵀ`` and never forms the full-size matrix.
  ``least_squares``: the ``mu'`` minimising ``‖up(mu', a_new) − up(mu, a_old)‖``, i.e.
  ``(a_new a_newᵀ)⁻¹ a_new a_oldᵀ`` applied to ``mu``.
  A traced bool selects between the two (True: unbiased), for ``"auto"`` under a traced decay.
  """
  hp = jax.lax.Precision.HIGHEST
  cross = jnp.einsum("...sd,...rd->...sr", a_new, a_old, precision=hp)  # a_new a_oldᵀ
  if isinstance(transfer, str) and transfer == "unbiased":
    change = cross
  else:
    gram = jnp.einsum("...sd,...td->...st", a_new, a_new, precision=hp)
    change = jnp.linalg.solve(gram, cross)
    if not isinstance(transfer, str):
      change = jnp.where(transfer, cross, change)
  return compressor.right_multiply(mu, change, plan).astype(mu.dtype)
