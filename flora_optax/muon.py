"""Muon whose momentum is kept compressed: ``optax.contrib.muon``'s chain around a Flora buffer.

Muon's only state is a momentum as large as its matrices, and its update is the momentum
orthogonalized, so the momentum's norm never reaches the weights. That is what a compressed
momentum needs: the projection sketch's inflated decompression (``‖M A‖ ≈ sqrt(1 + d/r)·‖M‖``)
is normalised away instead of being clipped or compensated by the learning rate.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from flora_optax import _layout, _options
from flora_optax.momentum import FloraMomentumState, momentum_parts

PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
# optax's own default (Keller Jordan's quintic), read from its public signature so that the two
# can never drift apart; "dion" is the per-step schedule of Ahn et al., 2025 (arXiv
# 2504.05295, Table 6), the other preset optax.contrib.muon accepts by name.
NS_PRESETS = {
    "standard": inspect.signature(optax.contrib.scale_by_muon).parameters["ns_coeffs"].default,
    "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
}


def _is_spec(x) -> bool:
  return isinstance(x, (MuonDimensionNumbers, _layout.MatrixAxes))


def _axes_tuple(value, label, name, shape) -> tuple[int, ...]:
  return _layout._as_axes(value, label, name, shape)  # noqa: SLF001 (same package)


def _dimension_numbers(name, shape, spec) -> MuonDimensionNumbers | None:
  """A leaf's spec (``None``, a ``MuonDimensionNumbers`` or a ``MatrixAxes``) as normalised
  ``MuonDimensionNumbers`` (tuples of non-negative axes), or an error naming the leaf."""
  if spec is None:
    return None
  if not _is_spec(spec):
    raise TypeError(f"the Muon dimension numbers of {name} {shape} must be a "
                    f"MuonDimensionNumbers, a flora_optax.MatrixAxes or None, got {spec!r}")
  if len(shape) < 2:
    raise ValueError(f"{name} {shape} has {len(shape)} axes; Muon orthogonalizes leaves with "
                     f"at least 2 (give it None to use the Adam fallback)")
  if isinstance(spec, _layout.MatrixAxes):
    _, rows, cols = _layout.matrix_view(name, shape, spec)
    return MuonDimensionNumbers(rows, cols)
  rows = _axes_tuple(spec.reduction_axis, "reduction_axis", name, shape)
  cols = _axes_tuple(spec.output_axis, "output_axis", name, shape)
  if not rows or not cols or set(rows) & set(cols) or len(set(rows + cols)) != len(rows + cols):
    raise ValueError(f"{spec} for {name} {shape}: reduction_axis and output_axis must each "
                     f"name at least one axis, and no axis twice")
  return MuonDimensionNumbers(rows, cols)


def resolve_dimension_numbers(spec, tree) -> Any:
  """A tree like `tree` with each leaf's normalised ``MuonDimensionNumbers`` (``None``: the
  leaf is not Muon's). `spec` is ``None`` (2-D leaves are Muon's, as in
  ``optax.contrib.muon``), a ``MuonDimensionNumbers`` or ``MatrixAxes``, a pytree prefix of
  them and ``None``, or a callable returning one. Leaves of an ``optax.partition`` masked
  tree (``optax.MaskedNode``) have no entry."""
  flat, treedef = _layout.flatten(tree)
  if spec is None:
    specs = [MuonDimensionNumbers() if len(jnp.shape(x)) == 2 else None for _, x in flat]
  else:
    if callable(spec) and not _is_spec(spec):
      spec = spec(tree)
    specs = _layout.broadcast_option(spec, tree, "muon_weight_dimension_numbers",
                                     is_leaf=_is_spec)
  dims = [_dimension_numbers(name, tuple(jnp.shape(x)), s) for (name, x), s in zip(flat, specs)]
  return jax.tree.unflatten(treedef, dims)


def _matrix_axes(dims: MuonDimensionNumbers, ndim: int) -> _layout.MatrixAxes:
  """The compressed view of a Muon leaf: the very matrices Newton–Schulz orthogonalizes."""
  rows, cols = tuple(dims.reduction_axis), tuple(dims.output_axis)
  batch = tuple(a for a in range(ndim) if a not in rows + cols)
  return _layout.MatrixAxes(rows=rows, cols=cols, batch=batch)


def _ns_coefficients(ns_coeffs):
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in NS_PRESETS:
      raise ValueError(f"ns_coeffs must be a preset in {tuple(NS_PRESETS)} or coefficients of "
                       f"shape (3,) or (steps, 3), got ns_coeffs={ns_coeffs!r}")
    return NS_PRESETS[ns_coeffs]
  shape = np.shape(ns_coeffs)
  if len(shape) not in (1, 2) or shape[-1] != 3:
    raise ValueError(f"ns_coeffs must have shape (3,) or (steps, 3), got shape {shape}")
  return ns_coeffs


def scale_by_flora_muon(
    rank: int,
    ns_coeffs: Any = "standard",
    ns_steps: int | jax.Array = 5,
    beta: float | jax.Array = 0.95,
    eps: float | jax.Array = 1e-8,
    *,
    kappa: int | None = 1000,
    seed: int = 0,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    weight_dimension_numbers: Any = None,
    **momentum_options,
) -> optax.GradientTransformation:
  r"""``optax.contrib.scale_by_muon`` whose momentum is a :func:`flora_momentum` buffer.

  With ``M_t`` the EMA ``β M_{t-1} + (1-β) G_t`` (kept compressed; what is read back is its
  decompression ``M̂_t``) and ``c_t = 1 - β^t``, the update is

  .. math::
     \text{nesterov: } O\!\left(\beta \frac{\hat M_t}{c_{t+1}} + (1-\beta)\frac{G_t}{c_t}\right),
     \qquad \text{else: } O\!\left(\frac{\hat M_t}{c_t}\right),

  ``O`` the Newton–Schulz orthogonalization of every matrix (``preconditioning`` normalises
  the input first, so ``O(s X) = O(X)`` for ``s > 0`` up to ``eps``): optax's recurrence
  exactly. Without nesterov the momentum's norm never reaches the update; with it only the
  balance between the momentum and the exact current gradient does.

  ``O`` is optax's own: ``scale_by_muon`` keeps a full-size ``mu`` in its state whatever
  ``beta`` is, so it cannot sit in the chain, but called statelessly with ``beta=0`` (its
  momentum is then the input itself, its bias correction 1) it is the orthogonalization
  alone, with optax's coefficients, preconditionings, ``eps`` and ``adaptive`` scaling.

  The matrices compressed are the ones orthogonalized: a leaf is viewed as the batch of
  ``(reduction, output)`` matrices its dimension numbers give. Every leaf must be a Muon
  leaf; :func:`flora_muon` sends the others to Adam.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = flora_optax.scale_by_flora_muon(rank=8)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> state.compressed_mu["w"].parts["c"].shape
    (64, 8)

  Args:
    rank: rank of the momentum's sketch (static int).
    ns_coeffs: Newton–Schulz coefficients: ``"standard"`` (optax's default), ``"dion"``, a
      triple, or one triple per step.
    ns_steps: Newton–Schulz iterations; with per-step coefficients one step runs per row, and
      ``ns_steps`` must be at least their number (as in optax).
    beta: momentum decay in ``[0, 1)``.
    eps: added to the norm that normalises the input of the iteration.
    kappa, seed: see :func:`flora_momentum`.
    nesterov: Nesterov's form, as in ``optax.contrib.scale_by_muon``.
    adaptive: scale each update by ``⟨momentum, O(momentum)⟩`` (Bernstein and Newhouse); with
      the projection sketch this reads the inflated norm of the decompressed momentum.
    preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"`` or ``"schatten"``.
    weight_dimension_numbers: ``MuonDimensionNumbers`` or ``MatrixAxes`` (or a prefix tree of
      them, or a callable returning one): how each leaf is viewed as matrices. ``None``: every
      leaf must be 2-D.
    **momentum_options: ``transfer``, ``emit``, ``residual_weight`` and the compression options of
      :class:`flora_optax.Compression` except ``axes`` (the view is the Muon one).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`FloraMomentumState`
    (its ``count`` is Muon's step count).

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Bernstein, Newhouse, `Old Optimizer, New Norm: An Anthology
    <https://arxiv.org/abs/2409.20325>`_, 2024.

    Hao, Cao, Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  momentum_options = _options.var_keywords(momentum_options, "momentum_options")
  if "axes" in momentum_options:
    raise ValueError("scale_by_flora_muon views each leaf as the matrices Muon orthogonalizes; "
                     "give that view as weight_dimension_numbers, not axes")
  ns_coeffs = _ns_coefficients(ns_coeffs)
  ns_steps = _options.check_count(ns_steps, "ns_steps", allow_traced=True)
  if np.ndim(ns_coeffs) == 2:
    if isinstance(ns_steps, jax.core.Tracer):
      raise TypeError("ns_steps must be static with per-step ns_coeffs; with "
                      "optax.inject_hyperparams pass static_args=('rank', 'ns_steps')")
    if len(ns_coeffs) > ns_steps:  # optax.contrib.scale_by_muon refuses it too
      raise ValueError(f"ns_coeffs has {len(ns_coeffs)} rows, one per Newton–Schulz step, more "
                       f"than ns_steps={ns_steps}; raise ns_steps or give fewer rows")
  _options.check_choice(preconditioning, PRECONDITIONINGS, "preconditioning")
  _options.check_decay(beta, "beta")

  def dims_of(tree):
    dims = resolve_dimension_numbers(weight_dimension_numbers, tree)
    for (name, x), d in zip(_layout.flatten(tree)[0], jax.tree.leaves(
        dims, is_leaf=lambda v: v is None or _is_spec(v))):
      if d is None:
        raise ValueError(f"scale_by_flora_muon orthogonalizes every leaf, but {name} "
                         f"{tuple(jnp.shape(x))} has no Muon dimension numbers; use "
                         f"flora_muon (Adam for such leaves) or optax.partition")
    return dims

  def compressed_view(tree):
    return jax.tree.map(lambda d, x: _matrix_axes(d, len(jnp.shape(x))), dims_of(tree),
                        _layout.map_unboxed(lambda x: x, tree), is_leaf=_is_spec)

  init_fn, step = momentum_parts(rank, beta, kappa, seed, axes=compressed_view,
                                 **momentum_options)

  def orthogonalize(mu_hat):
    # optax's scale_by_muon with beta=0 is the orthogonalization alone; its state (a zero
    # full-size `mu`) lives only inside this trace and is dropped.
    ortho = optax.contrib.scale_by_muon(
        ns_coeffs, ns_steps, beta=0.0, eps=eps, nesterov=False, adaptive=adaptive,
        preconditioning=preconditioning, weight_dimension_numbers=dims_of(mu_hat))
    return ortho.update(mu_hat, ortho.init(mu_hat))[0]

  def update_fn(updates, state, params=None):
    del params
    updates, rebox = _layout.unbox(updates)
    momentum, state = step(updates, state)
    count = state.count
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(momentum, beta, optax.safe_increment(count)),
          optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(momentum, beta, count)
    return rebox(orthogonalize(mu_hat)), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_muon_shape(weight_dimension_numbers: Any = None,
                        consistent_rms: float | jax.Array | None = None
                        ) -> optax.GradientTransformation:
  """The shape factor of ``optax.contrib.muon`` (stateless), for Muon's leaves.

  Each orthogonalized matrix ``(fan_in, fan_out)`` (reduction and output sizes) is scaled by
  ``sqrt(max(1, fan_out / fan_in))`` (Jordan's width scaling), or with ``consistent_rms``
  by ``sqrt(max(fan_in, fan_out)) · consistent_rms`` (Liu et al., arXiv 2502.16982), which
  gives every matrix about the same update RMS as AdamW's at ``0.2``.
  """
  def update_fn(updates, state, params=None):
    del params
    plain, rebox = _layout.unbox(updates)
    dims = resolve_dimension_numbers(weight_dimension_numbers, plain)

    def scale(u, d):
      if d is None:  # not a Muon leaf
        return u
      shape = jnp.shape(u)
      fan_in = math.prod(shape[a] for a in d.reduction_axis)
      fan_out = math.prod(shape[a] for a in d.output_axis)
      if consistent_rms is None:
        # (an empty matrix, fan_in 0, has an empty update: any finite factor will do)
        return jnp.sqrt(jnp.maximum(1, fan_out / max(fan_in, 1))) * u
      return jnp.sqrt(jnp.maximum(fan_in, fan_out)) * consistent_rms * u

    return rebox(jax.tree.map(scale, plain, dims, is_leaf=lambda x: x is None)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def flora_muon(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    ns_coeffs: Any = "standard",
    ns_steps: int | jax.Array = 5,
    beta: float | jax.Array = 0.95,
    eps: float | jax.Array = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    *,
    kappa: int | None = 1000,
    seed: int = 0,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    adam_b1: float | jax.Array = 0.9,
    adam_b2: float | jax.Array = 0.999,
    adam_eps_root: float | jax.Array = 0.0,
    adam_weight_decay: float | jax.Array = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: Any = None,
    consistent_rms: float | jax.Array | None = None,
    **momentum_options,
) -> optax.GradientTransformationExtraArgs:
  r"""Muon with its momentum kept compressed: ``optax.contrib.muon`` with a Flora buffer.

  The same partition as ``optax.contrib.muon``, with the same arguments::

      Muon leaves:   scale_by_flora_muon → scale_by_muon_shape
                     → add_decayed_weights(weight_decay, weight_decay_mask) → learning rate
      other leaves:  optax.adamw(adam_learning_rate, adam_b1, adam_b2, eps, adam_eps_root,
                                 adam_weight_decay, mu_dtype, nesterov=nesterov)

  Muon's momentum ``M ← β M + (1-β) G`` is the only buffer as large as its matrices; here it
  is a :func:`flora_momentum` buffer (any sketch, ``emit``, ``dtype``; about
  ``rank × max(n, m)`` numbers per matrix). Newton–Schulz normalises its input, so the norm
  of the decompressed momentum (inflated by ``sqrt(1 + d/rank)`` with the projection sketch)
  does not reach the update. Leaves the sketch would not shrink (``rank`` at or above the
  compressed side) and leaves the ``mask`` excludes keep optax's exact momentum: with
  ``mask=False`` this is ``optax.contrib.muon`` (tested to float tolerance).

  Which leaves are Muon's: ``muon_weight_dimension_numbers`` as in ``optax.contrib.muon``
  (``None``: every 2-D leaf; a tree of ``MuonDimensionNumbers`` with ``None`` for Adam's;
  or a callable), or the same tree written with :class:`flora_optax.MatrixAxes` as ``axes``.
  The compressed matrices are the orthogonalized ones. The Adam fallback (vectors by default)
  is ``optax.adamw``, uncompressed.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flora_optax
    >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
    >>> tx = flora_optax.flora_muon(learning_rate=0.02, rank=32)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a float or schedule for the Muon leaves.
    rank: rank of the momentum's sketch (static int).
    ns_coeffs, ns_steps, beta, eps, nesterov, adaptive, preconditioning: as in
      ``optax.contrib.muon`` (see :func:`scale_by_flora_muon`); ``eps`` is Adam's too.
    weight_decay, weight_decay_mask: decoupled weight decay of the Muon leaves (multiplied by
      the learning rate), as in ``optax.contrib.muon``.
    mu_dtype: dtype of Adam's first moment, and the storage ``dtype`` of the Muon momentum
      unless ``dtype`` is given (``"float32"``, ``"bfloat16"``, ``"float64"``).
    kappa, seed: resample period and seed of the sketches (see :func:`flora_momentum`).
    adam_b1, adam_b2, adam_eps_root, adam_weight_decay, adam_learning_rate: the Adam
      fallback, as in ``optax.contrib.muon`` (``adam_learning_rate=None``: ``learning_rate``).
    muon_weight_dimension_numbers: which leaves are Muon's and how they are viewed as
      matrices, as in ``optax.contrib.muon``.
    consistent_rms: as in ``optax.contrib.muon`` (see :func:`scale_by_muon_shape`).
    **momentum_options: ``transfer``, ``emit``, ``residual_weight`` (see
      :func:`flora_momentum`), the compression
      options of :class:`flora_optax.Compression` (``sketch``, ``mask``, ``dtype``, ...), and
      ``axes`` in place of ``muon_weight_dimension_numbers``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (an ``optax.partition``); the Muon part's
    state is a :class:`FloraMomentumState`.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.

    Hao, Cao, Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  momentum_options = _options.var_keywords(momentum_options, "momentum_options")
  axes = momentum_options.pop("axes", None)
  if axes is not None:
    if muon_weight_dimension_numbers is not None:
      raise ValueError("give the Muon matrix view once: muon_weight_dimension_numbers "
                       "(optax's MuonDimensionNumbers) or axes (flora_optax.MatrixAxes), not "
                       "both")
    muon_weight_dimension_numbers = axes
  if mu_dtype is not None:
    mu_dtype = jnp.dtype(mu_dtype)
    momentum_options.setdefault("dtype", mu_dtype)
  spec = muon_weight_dimension_numbers

  def labels(params):
    return jax.tree.map(lambda d: "adam" if d is None else "muon",
                        resolve_dimension_numbers(spec, params),
                        is_leaf=lambda d: d is None or _is_spec(d))

  def muon_dims(tree):  # only Muon's leaves reach the Muon chain (the others are masked)
    return resolve_dimension_numbers(spec, tree)

  muon = optax.chain(
      scale_by_flora_muon(rank, ns_coeffs, ns_steps, beta, eps, kappa=kappa, seed=seed,
                          nesterov=nesterov, adaptive=adaptive,
                          preconditioning=preconditioning, weight_dimension_numbers=muon_dims,
                          **momentum_options),
      scale_by_muon_shape(muon_dims, consistent_rms),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))
  adam = optax.adamw(learning_rate if adam_learning_rate is None else adam_learning_rate,
                     b1=adam_b1, b2=adam_b2, eps=eps, eps_root=adam_eps_root,
                     weight_decay=adam_weight_decay, mu_dtype=mu_dtype, nesterov=nesterov)
  return optax.partition({"muon": muon, "adam": adam}, labels)


__all__ = ["FloraMomentumState", "flora_muon", "scale_by_flora_muon", "scale_by_muon_shape"]
