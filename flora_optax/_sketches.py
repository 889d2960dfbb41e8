"""Compression methods: how one leaf's matrix is stored small, and recovered.

A method implements :class:`Sketch` once; the transforms (momentum, accumulation,
microbatching) are written against this interface only. All maps are linear in the leaf, so a
running mean or an EMA of compressed values is the compressed running mean or EMA, as
Algorithms 1 and 2 need. The random matrices are regenerated from a key and never stored.

* :class:`RandomProjection` (the paper): ``C = X Aᵀ`` (or ``A X``), ``X̂ = C A`` with
  ``E[AᵀA] = I``; unbiased, with noise of about ``(d/r)·‖X‖²``.
* :class:`TwoSided` (Tropp, Yurtsever, Udell and Cevher, 2017): a range sketch ``Y = X Ωᵀ``
  and a co-range sketch ``W = Ψ X``; ``X̂ = Q (ΨQ)⁺ W`` with ``Q = orth(Y)`` is exact for
  ``rank(X) ≤ k`` and close to the best rank-``k`` approximation otherwise (biased: a
  truncation). See ``docs/spec.md``.
* :class:`OnlineFactors` (Wang, Liang, He, Wang and Tan, ICLR 2026, "LoRA-Pre"): the buffer
  is a product ``B A`` of thin factors, updated by one Newton step per factor at each fold.
  Not linear, so it is written through :meth:`Sketch.fold`, the verb every transform uses.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from flora_optax._layout import LeafLayout


@dataclasses.dataclass(frozen=True)
class Sketch(abc.ABC):
  """The interface of a compression method (one instance per set of options)."""

  rank: int
  projection: str
  compute_dtype: Any
  precision: Any

  # Whether compress(x, scale=...) is cheaper than compressing the scaled leaf; transforms
  # pass a scale only where it is (flora_adafactor's folded preconditioner).
  scales_cheaply = False

  @abc.abstractmethod
  def fits(self, n: int, m: int, side: str) -> tuple[bool, str]:
    """Whether a ``rank`` buffer of an ``n × m`` matrix is smaller than it (and why not)."""

  @abc.abstractmethod
  def buffer_shapes(self, leaf: LeafLayout) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays that hold one compressed leaf."""

  @abc.abstractmethod
  def buffer_axes(self, leaf: LeafLayout) -> dict[str, tuple]:
    """For each buffer axis, the group of leaf axes it stands for (``None``: a sketch axis)."""

  @abc.abstractmethod
  def draw_shapes(self, leaf: LeafLayout) -> dict[str, tuple[int, ...]]:
    """Shapes of the random matrices of a leaf (leaves with equal ones are drawn together)."""

  @abc.abstractmethod
  def draw(self, key, leaf: LeafLayout) -> dict[str, jax.Array]:
    """The random matrices of a leaf for one key (one cycle)."""

  # Whether buffers are linear in what was folded into them (a running mean of compressed
  # values is the compressed running mean); microbatching's aggregation needs it.
  linear = True

  def initial(self, key, leaf: LeafLayout) -> dict[str, jax.Array]:
    """The buffers of a zero matrix (`key`: the leaf's key of cycle 0, for methods that
    start from a random state)."""
    del key
    return {name: jnp.zeros(shape, self.compute_dtype)
            for name, shape in self.buffer_shapes(leaf).items()}

  def fold(self, parts, x, draws, leaf: LeafLayout, mix, rate, scale=None):
    """`parts` with the leaf `x` folded in, the buffers of ``(1 - rate)·X̂ + rate·x``.

    A linear method compresses `x` and combines entry-wise, ``mix(old, new)`` (the exact
    arithmetic of the transform's plain leaves: an EMA, or Welford's running mean); a
    method that is not linear uses `rate` (a scalar in ``(0, 1]``) itself."""
    del rate
    return jax.tree.map(mix, parts, self.compress(x, draws, leaf, scale))

  def reset(self, parts) -> dict[str, jax.Array]:
    """The buffers of a zero matrix, following `parts` (a new accumulation cycle)."""
    return jax.tree.map(jnp.zeros_like, parts)

  @abc.abstractmethod
  def compress(self, x, draws, leaf: LeafLayout, scale=None) -> dict[str, jax.Array]:
    """A full-size leaf to its buffers (linear in `x`).

    `scale`, if given, is a pair of vectors ``(rows, cols)`` of shapes ``(*batch, n)`` and
    ``(*batch, m)``: the buffers of ``diag(rows) · X · diag(cols)`` (matrix view), computed
    with the scales moved onto the small matrices so the scaled leaf is never formed.
    """

  @abc.abstractmethod
  def decompress(self, parts, draws, leaf: LeafLayout, residual=None,
                 residual_scale=1.0, scale=None) -> jax.Array:
    """Buffers to a full-size leaf; with `residual`, add ``residual_scale`` times its part
    outside the subspace. (The residual comes unscaled so that its down-projection is the
    same computation as the fold's, which XLA then does once.)"""

  @abc.abstractmethod
  def transfer(self, parts, old, new, leaf: LeafLayout, how) -> dict[str, jax.Array]:
    """Buffers drawn with `old` re-expressed with `new` (a resample), never a full matrix."""

  def _mm(self, spec, a, b):
    return jnp.einsum(spec, a, b, precision=self.precision,
                      preferred_element_type=self.compute_dtype)


class RandomProjection(Sketch):
  """The paper's one-sided projection ``A`` of shape ``(*batch, rank, d)``."""

  scales_cheaply = True

  @property
  def orthogonal_rows(self) -> bool:
    """``AAᵀ = (d/r)·I`` by construction (up to rounding): least-squares steps need no solve."""
    return self.projection in ("dct", "orthogonal")

  def fits(self, n, m, side):
    d = m if side == "cols" else n
    return self.rank < d, f"its compressed side ({side}) has size {d}"

  def _check_dim(self, leaf):
    if self.projection == "dct" and leaf.dim > DCT_MAX_DIM:
      raise ValueError(f"projection='dct' supports a compressed side of at most 2**29, but "
                       f"{leaf.name} {leaf.shape} compresses its {leaf.side} of d={leaf.dim}; "
                       f"use another projection or side for it")

  def buffer_shapes(self, leaf):
    self._check_dim(leaf)  # at init, so an impossible leaf never reaches a training step
    if leaf.side == "cols":
      return {"c": leaf.batch_shape + (leaf.n, self.rank)}
    return {"c": leaf.batch_shape + (self.rank, leaf.m)}

  def buffer_axes(self, leaf):
    batch = tuple((a,) for a in leaf.batch_axes)
    if leaf.side == "cols":
      return {"c": batch + (leaf.row_axes, None)}
    return {"c": batch + (None, leaf.col_axes)}

  def draw_shapes(self, leaf):
    return {"a": leaf.batch_shape + (self.rank, leaf.dim)}

  def draw(self, key, leaf):
    self._check_dim(leaf)
    return {"a": make_projection(key, self.draw_shapes(leaf)["a"], self.projection,
                                 self.compute_dtype)}

  def _split(self, scale, leaf, dtype):
    """``(projected, kept)``: the scale along the axis ``A`` projects, and the other."""
    rows, cols = _scales(scale, dtype)
    return (cols, rows) if leaf.side == "cols" else (rows, cols)

  def compress(self, x, draws, leaf, scale=None):
    x, a = leaf.to_matrix(x), draws["a"]
    projected, kept = self._split(scale, leaf, a.dtype)
    if projected is not None:  # diag(p) X Aᵀ... = X (A diag(p))ᵀ: the scale moves onto A
      a = a * projected[..., None, :]
    if leaf.side == "cols":
      c = self._mm("...nm,...rm->...nr", x, a)
      return {"c": c if kept is None else c * kept[..., :, None]}
    c = self._mm("...rn,...nm->...rm", a, x)
    return {"c": c if kept is None else c * kept[..., None, :]}

  def decompress(self, parts, draws, leaf, residual=None, residual_scale=1.0, scale=None):
    c, a = parts["c"], draws["a"]
    cols = leaf.side == "cols"
    r = None
    if residual is not None:
      # C A + s (I - P) R = (C - s (AAᵀ)⁻¹ A R…) A + s R, P the orthogonal projector on the
      # rows of A (on the side it compresses): one up-projection, and the down-projection of
      # R is compress(R), the fold's own. With `scale` the residual is diag(rows) R diag(cols)
      # (flora_adafactor's preconditioned update), formed only inside the final sum.
      r = _apply_scales(leaf.to_matrix(residual).astype(c.dtype), scale)
      down = self.compress(residual, draws, leaf, scale=scale)["c"]
      if self.orthogonal_rows:   # AAᵀ = (d/r)·I: no Gram matrix, no solve
        c = c - (residual_scale * self.rank / leaf.dim) * down
      elif cols:
        gram = self._mm("...rd,...sd->...rs", a, a)
        c = c - residual_scale * jnp.swapaxes(
            solve_gram(gram, jnp.swapaxes(down, -1, -2)), -1, -2)
      else:
        c = c - residual_scale * solve_gram(self._mm("...rd,...sd->...rs", a, a), down)
    x = self._mm("...nr,...rm->...nm", c, a) if cols else self._mm("...rn,...rm->...nm", a, c)
    if r is not None:
      x = x + residual_scale * r
    return leaf.from_matrix(x)

  def transfer(self, parts, old, new, leaf, how):
    """``how="unbiased"``: ``up`` with the old projection, ``down`` with the new one (the
    paper). ``"least_squares"``: the buffer whose decompression is closest to the old one.
    A traced bool chooses per leaf (True: unbiased). Both go through ``(r, r)`` matrices."""
    hp = jax.lax.Precision.HIGHEST
    a_old, a_new = old["a"], new["a"]
    cross = jnp.einsum("...sd,...rd->...sr", a_new, a_old, precision=hp)
    change = cross
    if not (isinstance(how, str) and how == "unbiased"):
      if self.orthogonal_rows:   # A_new A_newᵀ = (d/r)·I: a scaled cross product, no solve
        change = cross * (self.rank / leaf.dim)
      else:
        change = solve_gram(jnp.einsum("...sd,...td->...st", a_new, a_new, precision=hp), cross)
      if not isinstance(how, str):
        change = jnp.where(how, cross, change)
    c = parts["c"]
    if leaf.side == "cols":
      return {"c": self._mm("...nr,...sr->...ns", c, change)}
    return {"c": self._mm("...sr,...rm->...sm", change, c)}


class TwoSided(Sketch):
  """Range and co-range sketches of the leaf's matrix, oriented so that ``N ≥ M``."""

  def sizes(self, n, m) -> tuple[int, int]:
    """``(k, l)``: the largest ``k`` with ``N·k + l·M ≤ rank·N`` and ``l = 2k + 1`` (Tropp et
    al.'s advice), so the state matches a projection's ``rank × max(n, m)`` numbers."""
    big, small = max(n, m), min(n, m)
    k = (big * self.rank - small) // (big + 2 * small)
    return k, min(2 * k + 1, big)

  def fits(self, n, m, side):
    del side
    k, _ = self.sizes(n, m)
    if self.rank >= min(n, m):
      return False, f"its smaller side has size {min(n, m)}"
    return k >= 1, f"a two-sided sketch of rank {self.rank} would keep k={k} columns"

  def _oriented(self, leaf):
    return leaf.n >= leaf.m

  def buffer_shapes(self, leaf):
    k, l = self.sizes(leaf.n, leaf.m)
    big, small = max(leaf.n, leaf.m), min(leaf.n, leaf.m)
    return {"range": leaf.batch_shape + (big, k), "corange": leaf.batch_shape + (l, small)}

  def buffer_axes(self, leaf):
    batch = tuple((a,) for a in leaf.batch_axes)
    big, small = ((leaf.row_axes, leaf.col_axes) if self._oriented(leaf)
                  else (leaf.col_axes, leaf.row_axes))
    return {"range": batch + (big, None), "corange": batch + (None, small)}

  def draw_shapes(self, leaf):
    k, l = self.sizes(leaf.n, leaf.m)
    big, small = max(leaf.n, leaf.m), min(leaf.n, leaf.m)
    return {"omega": leaf.batch_shape + (k, small), "psi": leaf.batch_shape + (l, big)}

  def draw(self, key, leaf):
    shapes = self.draw_shapes(leaf)
    k_omega, k_psi = jax.random.split(key)
    return {"omega": jax.random.normal(k_omega, shapes["omega"], self.compute_dtype),
            "psi": jax.random.normal(k_psi, shapes["psi"], self.compute_dtype)}

  def _to(self, x, leaf):
    x = leaf.to_matrix(x)
    return x if self._oriented(leaf) else jnp.swapaxes(x, -1, -2)

  def _from(self, x, leaf):
    return leaf.from_matrix(x if self._oriented(leaf) else jnp.swapaxes(x, -1, -2))

  def compress(self, x, draws, leaf, scale=None):
    # A scale would have to go onto Ω and Ψ, which the decompression also reads unscaled:
    # XLA then recomputes the larger draws for each reader, which costs more than it saves
    # (benchmarks/cost_model.py), so the scaled leaf is formed here.
    if scale is not None:
      x = leaf.from_matrix(_apply_scales(leaf.to_matrix(x), scale))
    x = self._to(x, leaf)
    return {"range": self._mm("...NM,...kM->...Nk", x, draws["omega"]),
            "corange": self._mm("...lN,...NM->...lM", draws["psi"], x)}

  def factors(self, parts, draws):
    """``(Q, B)`` with ``X̂ = Q B``: ``Q = orth(Y)`` (``N × k``), ``B = (ΨQ)⁺ W`` (``k × M``).

    ``Q`` comes from a Householder QR, orthonormal even where ``Y`` is rank-deficient (a zero
    or rank-1 EMA). ``B`` solves the normal equations ``(PᵀP) B = Pᵀ W``, ``P = ΨQ``, through
    :func:`solve_gram`: a triangular solve with the ``R`` of ``P`` returned ~10⁸·‖X‖ for a
    degenerate draw of ``Ψ`` (repeated rows) and NaN for a zero one. ``P`` is an ``l × k``
    Gaussian with ``l = 2k + 1``, condition number ≈ 6, so squaring it costs no accuracy in
    float32 (exact recovery of rank-``k`` inputs is as close as with the QR). Both small
    products run at full precision, as the projection's transfer does: a reduced-precision
    Gram (TF32) would lose the digits the squaring needs.
    """
    hp = jax.lax.Precision.HIGHEST
    q, _ = jnp.linalg.qr(parts["range"].astype(self.compute_dtype))
    p = self._mm("...lN,...Nk->...lk", draws["psi"], q)
    b = solve_gram(jnp.einsum("...lk,...lj->...kj", p, p, precision=hp),
                   jnp.einsum("...lk,...lM->...kM", p, parts["corange"].astype(p.dtype),
                              precision=hp))
    return q, b

  def decompress(self, parts, draws, leaf, residual=None, residual_scale=1.0):
    q, b = self.factors(parts, draws)
    r = None
    if residual is not None:  # Q B + s (I - QQᵀ) R = Q (B - s QᵀR) + s R: one up-projection
      r = self._to(residual, leaf).astype(b.dtype)
      b = b - residual_scale * self._mm("...Nk,...NM->...kM", q, r)
    x = self._mm("...Nk,...kM->...NM", q, b)
    if r is not None:
      x = x + residual_scale * r
    return self._from(x, leaf)

  def transfer(self, parts, old, new, leaf, how):
    """Re-sketch ``X̂ = Q B`` through its factors: ``Y' = Q (B Ω'ᵀ)``, ``W' = (Ψ' Q) B``."""
    del leaf, how
    q, b = self.factors(parts, old)
    return {"range": self._mm("...Nk,...kj->...Nj", q,
                              self._mm("...kM,...jM->...kj", b, new["omega"])),
            "corange": self._mm("...lk,...kM->...lM",
                                self._mm("...lN,...Nk->...lk", new["psi"], q), b)}


class OnlineFactors(Sketch):
  r"""The buffer as a product ``X̂ = B A`` (``B``: ``n × k``, ``A``: ``k × m``), folded online.

  An EMA ``M ← (1-ρ)M + ρG`` is one gradient step, at rate ``ρ``, of ``min_M ½‖M - G‖²``.
  With ``M = B A``, one Newton step on each factor at rate ``γ``, ``1 - γ = sqrt(1 - ρ)``:

  .. math::  B \leftarrow (1-γ)B + γ\, G A^	op (A A^	op)^{-1}, \qquad
             A \leftarrow (1-γ)A + γ\, (B^	op B)^{-1} B^	op G

  so the product decays by ``(1-γ)² = 1 - ρ`` per fold, like the EMA (Wang, Liang, He, Wang
  and Tan, ICLR 2026, arXiv 2602.24283). ``A``'s step reads the *new* ``B``; the paper's
  reads the old one. Measured on synthetic streams (``python -m benchmarks.factor_forms``,
  docs/spec.md), the sequential form keeps the product's norm at the EMA's (1.00× against
  1.03× on a near-low-rank stream) and tracks it from the first step (cosine 0.97 against
  0.27 after one fold); it is also what makes a running mean work: at ``ρ = 1`` the paper's
  step sets ``A = 0`` from ``B = 0``.

  After each fold the rows of ``A`` are rescaled to unit norm and ``B``'s columns by the
  inverse (the recurrence is equivariant under ``B D⁻¹, D A``, so the product does not
  change): no factor under- or overflows when the other grows, and a zero update never
  zeroes ``A``, which could not recover.

  Both steps are least-squares solves done through thin QRs of ``Aᵀ`` and ``B`` (as many
  flops as forming the Gram matrices), not the normal equations: a random ``A₀`` badly
  aligned with the updates gives a ``B`` whose Gram squares that conditioning (float32 normal
  equations left errors up to 16 % on exact low-rank running means; the QRs 1.8e-4,
  docs/spec.md). A direction a factor does not span (all of ``B = 0`` at the start) gets a
  zero component (:func:`_triangular_solve`), never an inf or a NaN.

  ``rank`` sets the memory, ``k = ⌊rank·max(n, m)/(n + m)⌋`` so that ``k(n + m) ≤
  rank·max(n, m)``. ``B`` starts at zero and ``A`` at random orthonormal rows from the
  leaf's key; nothing is drawn afterwards and nothing is resampled (``kappa`` has no effect).
  """

  linear = False

  def sizes(self, n, m) -> int:
    return self.rank * max(n, m) // (n + m)

  def fits(self, n, m, side):
    del side
    if self.rank >= min(n, m):
      return False, f"its smaller side has size {min(n, m)}"
    k = self.sizes(n, m)
    return k >= 1, f"factors of rank {self.rank} would keep k={k} components"

  def buffer_shapes(self, leaf):
    k = self.sizes(leaf.n, leaf.m)
    return {"b": leaf.batch_shape + (leaf.n, k), "a": leaf.batch_shape + (k, leaf.m)}

  def buffer_axes(self, leaf):
    batch = tuple((a,) for a in leaf.batch_axes)
    return {"b": batch + (leaf.row_axes, None), "a": batch + (None, leaf.col_axes)}

  def draw_shapes(self, leaf):
    del leaf
    return {}

  def draw(self, key, leaf):
    del key, leaf
    return {}

  def initial(self, key, leaf):
    shapes = self.buffer_shapes(leaf)
    k, m = shapes["a"][-2:]
    rows = make_projection(key, shapes["a"], "orthogonal", self.compute_dtype)
    return {"b": jnp.zeros(shapes["b"], self.compute_dtype),
            "a": rows * jnp.asarray(math.sqrt(k / m), self.compute_dtype)}

  def compress(self, x, draws, leaf, scale=None):
    raise TypeError("sketch='factors' is not a linear sketch: an update is folded into the "
                    "factors (Sketch.fold), never compressed on its own")

  def fold(self, parts, x, draws, leaf, mix, rate, scale=None):
    del draws, mix
    x = leaf.to_matrix(x).astype(self.compute_dtype)
    if scale is not None:
      x = _apply_scales(x, scale)
    keep = jnp.sqrt(1 - jnp.asarray(rate, self.compute_dtype))
    b, a = parts["b"], parts["a"]
    # B ← (1-γ)B + γ G Aᵀ(AAᵀ)⁻¹ = (1-γ)B + γ (G Q) R⁻ᵀ with Aᵀ = Q R.
    q, r = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))
    b = keep * b + (1 - keep) * jnp.swapaxes(
        _triangular_solve(r, self._mm("...nm,...mk->...kn", x, q)), -1, -2)
    # A ← (1-γ)A + γ (BᵀB)⁻¹BᵀG = (1-γ)A + γ R⁻¹ (Qᵀ G) with B = Q R (the new B).
    q, r = jnp.linalg.qr(b)
    a_new = keep * a + (1 - keep) * _triangular_solve(r, self._mm("...nk,...nm->...km", q, x))
    norms = jnp.linalg.norm(a_new, axis=-1)
    alive = norms > jnp.finfo(self.compute_dtype).tiny
    safe = jnp.where(alive, norms, 1.0)
    a = jnp.where(alive[..., None], a_new / safe[..., None], a)
    b = b * jnp.where(alive, norms, 0.0)[..., None, :]
    return {"b": b, "a": a}

  def reset(self, parts):
    # A keeps the subspace of the last mean (a warm start); the product is zero.
    return {"b": jnp.zeros_like(parts["b"]), "a": parts["a"]}

  def decompress(self, parts, draws, leaf, residual=None, residual_scale=1.0):
    del draws
    b, a = parts["b"], parts["a"]
    if residual is None:
      return leaf.from_matrix(self._mm("...nk,...km->...nm", b, a))
    # B A + s (I - P) R with P = Q Qᵀ the projector on A's rows (Aᵀ = Q T):
    # B A = (B Tᵀ) Qᵀ, so the whole is (B Tᵀ - s R Q) Qᵀ + s R, one up-projection.
    r = leaf.to_matrix(residual).astype(b.dtype)
    q, t = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))
    left = self._mm("...nk,...jk->...nj", b, t) - residual_scale * self._mm(
        "...nm,...mk->...nk", r, q)
    return leaf.from_matrix(self._mm("...nk,...mk->...nm", left, q) + residual_scale * r)

  def transfer(self, parts, old, new, leaf, how):
    """Nothing to move: the factors follow the updates and are never resampled."""
    del old, new, leaf, how
    return parts


def _triangular_solve(r, rhs):
  """``R⁻¹ rhs`` for upper-triangular ``(…, k, k)`` ``R`` from a
  QR, truncated: a pivot below ``k·eps`` of the largest one (a direction the factor does not
  span, e.g. all of a zero ``B``) gets a zero component instead of an inf or a NaN."""
  d = jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))
  k = r.shape[-1]
  dead = d <= k * jnp.finfo(r.dtype).eps * jnp.max(d, axis=-1, keepdims=True) + jnp.finfo(
      r.dtype).tiny
  eye = jnp.eye(k, dtype=r.dtype)
  # Dead rows and columns become identity: the live block is solved alone, dead entries are 0.
  mask = jnp.logical_or(dead[..., :, None], dead[..., None, :])
  r = jnp.where(mask, eye, r)
  rhs = jnp.where(dead[..., :, None], 0.0, rhs)
  return jax.scipy.linalg.solve_triangular(r, rhs, lower=False)


def solve_gram(gram, rhs):
  """``(gram + λI)⁻¹ rhs`` for a batch of symmetric positive semi-definite ``(r, r)`` Gram
  matrices; the one solve every method uses (transfers, residuals, factors).

  A Gram matrix may be singular (a zero factor, rows of a Rademacher draw that repeat), and a
  plain solve then returns inf or NaN into the state. ``λ`` is a small multiple of the mean
  diagonal (plus the smallest normal number, so an all-zero Gram solves to zero)."""
  r = gram.shape[-1]
  mean_diag = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] / r
  lam = GRAM_RIDGE * mean_diag + jnp.finfo(gram.dtype).tiny
  return jnp.linalg.solve(gram + lam * jnp.eye(r, dtype=gram.dtype), rhs)


# Relative ridge of `solve_gram`. 1e-6 is robust for exactly singular Grams in float32: the
# right-hand sides lie in the Gram's range, so a null direction receives only rounding over
# λ. Measured on Rademacher transfers (d/r = 4/3, 8/6, 8/7, 16/12; 157 of 800 draws singular)
# against a float64 pinv: the decompressed result within 5e-5 relative, the buffer's null
# component up to 9% of its norm, which decompression and the next transfer multiply by A
# (vᵀA = 0) and so drop; on well-conditioned draws the ridge moves nothing beyond 1e-5.
GRAM_RIDGE = 1e-6


def _scales(scale, dtype):
  if scale is None:
    return None, None
  return tuple(None if v is None else v.astype(dtype) for v in scale)


def _apply_scales(x, scale):
  """``diag(rows) · x · diag(cols)`` for a matrix view `x` and ``scale = (rows, cols)``."""
  rows, cols = _scales(scale, x.dtype)
  x = x if rows is None else x * rows[..., :, None]
  return x if cols is None else x * cols[..., None, :]


SKETCH_CLASSES = {"projection": RandomProjection, "two_sided": TwoSided,
                  "factors": OnlineFactors}


def make_sketch(options) -> Sketch:
  return SKETCH_CLASSES[options.sketch](options.rank, options.projection, options.compute_dtype,
                                        options.precision)


def make_projection(key, shape, kind: str, dtype) -> jax.Array:
  """A random ``(*batch, r, d)`` matrix with ``E[AᵀA] = I`` for each batch entry.

  * ``gaussian``: i.i.d. ``N(0, 1/r)`` entries (the paper's choice).
  * ``rademacher``: i.i.d. ``±1/sqrt(r)`` entries; same expectation, cheaper to draw.
  * ``orthogonal``: ``sqrt(d/r)·Q`` with ``Q`` Haar-distributed orthonormal rows (QR of a
    Gaussian with the signs of ``R``'s diagonal fixed), so ``AᵀA = (d/r)·P`` exactly.
  * ``dct``: ``sqrt(d/r)·S C D``: random signs ``D``, the orthonormal DCT-II ``C`` and ``r``
    distinct random rows ``S``. Orthogonal rows like ``orthogonal`` (``AAᵀ = (d/r)·I``) with
    no QR: every entry is a closed-form cosine.
  """
  *batch, r, d = shape
  if kind == "gaussian":
    return jax.random.normal(key, shape, dtype) * jnp.asarray(1.0 / math.sqrt(r), dtype)
  if kind == "rademacher":
    return jax.random.rademacher(key, shape, dtype) * jnp.asarray(1.0 / math.sqrt(r), dtype)
  if kind == "orthogonal":
    g = jax.random.normal(key, (*batch, d, r), jnp.float32)
    q, upper = jnp.linalg.qr(g, mode="reduced")
    signs = jnp.sign(jnp.diagonal(upper, axis1=-2, axis2=-1))
    q = q * jnp.where(signs == 0, 1.0, signs)[..., None, :]
    return (jnp.swapaxes(q, -1, -2) * math.sqrt(d / r)).astype(dtype)
  if kind == "dct":
    k_rows, k_signs = jax.random.split(key)
    freqs = jnp.argsort(jax.random.uniform(k_rows, (*batch, d)), axis=-1)[..., :r]
    signs = jax.random.rademacher(k_signs, (*batch, 1, d), dtype)
    return _dct_rows(freqs.astype(jnp.uint32), d, dtype) * signs * math.sqrt(d / r)
  raise ValueError(f"unknown projection {kind!r}")


# The largest compressed side `projection="dct"` builds exactly: its phases are residues mod 4d
# formed in uint32, and a residue times 2 must not overflow (4d ≤ 2**31).
DCT_MAX_DIM = 2**29


def _dct_rows(freqs, d: int, dtype) -> jax.Array:
  """Rows ``freqs`` of the orthonormal DCT-II of size ``d``: ``c_k cos(π (2j+1) k / (2d))``.

  The phase ``(2j+1)·k mod 4d`` is formed exactly in uint32 integers, so the float angle
  stays accurate where ``(2j+1)·k`` itself would lose digits in float32. ``k`` is taken in
  limbs of ``b`` bits by Horner's rule, reducing mod ``4d`` after each step: a residue
  (``< 4d``) times ``2**b`` and an odd number (``< 2d``) times a limb (``< 2**b``) then
  stay below ``2**32`` whenever ``2**b · d ≤ 2**30``. That holds for every
  ``d ≤ DCT_MAX_DIM = 2**29`` (one bit per limb there; one limb up to ``d = 2**15``, two up
  to ``2**20``). The float32 angle then errs by at most an ulp of a number below ``2π``.
  """
  if d > DCT_MAX_DIM:
    raise ValueError(f"projection='dct' builds rows for a compressed side of at most "
                     f"2**29, got d={d}")
  period = jnp.uint32(4 * d)
  odd = (2 * jnp.arange(d, dtype=jnp.uint32) + 1)[None, :]
  k = freqs[..., :, None]
  k_bits = max((d - 1).bit_length(), 1)
  limb_bits = min(30 - (d - 1).bit_length(), k_bits)
  phase = jnp.zeros((), jnp.uint32)
  for shift in reversed(range(0, k_bits, limb_bits)):
    limb = (k >> jnp.uint32(shift)) & jnp.uint32(2**limb_bits - 1)
    phase = (phase * jnp.uint32(2**limb_bits) % period + odd * limb) % period
  rows = jnp.cos(phase.astype(jnp.float32) * (math.pi / (2 * d)))
  scale = jnp.where(k == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d))
  return (rows * scale).astype(dtype)
