"""The two-sided sketch, the residual emit and the DCT projection, against plain references.

The two-sided sketch is biased (a truncation), so it is tested for what it promises instead
of unbiasedness: exact recovery of low-rank inputs, linearity of its running mean, a transfer
that preserves its reconstruction, and an error close to the best rank-k approximation's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from flora_optax import _sketches
from tests import reference

STACK = flora_optax.MatrixAxes(rows=1, cols=2, batch=0)
PARAMS = {"tall": jnp.zeros((48, 24)), "wide": jnp.zeros((20, 40)),
          "stack": jnp.zeros((3, 30, 16)), "bias": jnp.zeros(16)}
AXES = {"tall": None, "wide": None, "stack": STACK, "bias": None}
RANK = 8


def low_rank(rng, shape, r, batch=()):
  n, m = shape[-2:]
  return np.einsum("...nr,...rm->...nm", rng.standard_normal(batch + (n, r)),
                   rng.standard_normal(batch + (r, m)))


def low_rank_tree(rng, r, basis=None):
  """A tree of rank-`r` matrices sharing a fixed column space per leaf (`basis`)."""
  out = {}
  for name, p in PARAMS.items():
    if p.ndim == 1:
      out[name] = jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
      continue
    batch = p.shape[:-2]
    u = basis[name] if basis else rng.standard_normal(batch + (p.shape[-2], r))
    out[name] = jnp.asarray(np.einsum("...nr,...rm->...nm", u, rng.standard_normal(
        batch + (r, p.shape[-1]))), jnp.float32)
  return out


def test_equal_memory_with_the_projection():
  for name, p in PARAMS.items():
    one = flora_optax.memory_report({name: p}, RANK, axes={name: AXES[name]})
    two = flora_optax.memory_report({name: p}, RANK, axes={name: AXES[name]},
                                    sketch="two_sided")
    assert two.flora_bytes <= one.flora_bytes, name
    assert two.leaves[0].compressed == one.leaves[0].compressed, name
  report = flora_optax.memory_report(PARAMS, RANK, axes=AXES, sketch="two_sided")
  tall = next(leaf for leaf in report.leaves if leaf.name == "params['tall']")
  # k = (48·8 − 24) // (48 + 2·24) = 3, l = 2k + 1 = 7: 48·3 + 7·24 = 312 ≤ 48·8 numbers
  assert tall.buffer_shapes == {"range": (48, 3), "corange": (7, 24)}


def test_accumulation_recovers_a_low_rank_mean_exactly(rng):
  """k = 8 micro-gradients of rank 1 in a shared 2-D column space: the mean has rank 2 ≤ k
  of every leaf, and the two-sided reconstruction is exact (the projection's is not)."""
  basis = {name: rng.standard_normal(p.shape[:-2] + (p.shape[-2], 2))
           for name, p in PARAMS.items() if p.ndim > 1}
  grads = [low_rank_tree(rng, 2, basis) for _ in range(8)]
  mean = jax.tree.map(lambda *g: np.mean(np.asarray(g, np.float64), axis=0), *grads)
  for sketch, exact in (("two_sided", True), ("projection", False)):
    tx = flora_optax.flora_accumulate(optax.identity(), 8, RANK, sketch=sketch, axes=AXES)
    state = tx.init(PARAMS)
    for g in grads:
      out, state = jax.jit(tx.update)(g, state)
    for name in PARAMS:
      err = np.abs(np.asarray(out[name]) - mean[name]).max() / np.abs(mean[name]).max()
      assert (err < 1e-4) == exact or name == "bias", (sketch, name, err)


def test_running_mean_is_linear_in_the_sketch(rng):
  """The state after k micro-steps is the sketch of the mean, with the regenerated Ω and Ψ."""
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                        PARAMS) for _ in range(3)]
  tx = flora_optax.flora_accumulate(optax.identity(), 4, RANK, seed=5, sketch="two_sided",
                                    axes=AXES)
  state = tx.init(PARAMS)
  for g in grads:
    _, state = tx.update(g, state)
  draws = flora_optax.projections(PARAMS, RANK, 0, 5, transform="accumulate",
                                  sketch="two_sided", axes=AXES)
  views = {"tall": reference.View((48, 24)), "wide": reference.View((20, 40)),
           "stack": reference.View((3, 30, 16), batch=(0,), rows=(1,), cols=(2,))}
  for name, view in views.items():
    x = np.mean([view.to(g[name]) for g in grads], axis=0)
    if view.n < view.m:  # the sketch works on the orientation with N ≥ M
      x = np.swapaxes(x, -1, -2)
    omega, psi = (np.asarray(draws[name][k], np.float64) for k in ("omega", "psi"))
    parts = state.compressed_acc[name].parts
    np.testing.assert_allclose(parts["range"], x @ np.swapaxes(omega, -1, -2), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(parts["corange"], psi @ x, rtol=1e-4, atol=1e-4)


def test_momentum_of_a_low_rank_stream_is_exact_across_resamples(rng):
  """A stream in a fixed rank-2 row and column space: the EMA has rank ≤ 2 < k, so the
  reconstruction equals the float64 EMA at every step, including right after each resample
  (the transfer re-sketches the reconstruction through its factors)."""
  u = {n: rng.standard_normal(p.shape[:-2] + (p.shape[-2], 2)) for n, p in PARAMS.items()
       if p.ndim > 1}
  v = {n: rng.standard_normal(p.shape[:-2] + (2, p.shape[-1])) for n, p in PARAMS.items()
       if p.ndim > 1}
  grads = []
  for _ in range(10):
    g = {n: jnp.asarray(np.einsum("...nr,rs,...sm->...nm", u[n], rng.standard_normal((2, 2)),
                                  v[n]), jnp.float32) for n in u}
    g["bias"] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    grads.append(g)
  # The sketch's own reconstruction (the residual would add the rounding of a QR of a
  # rank-deficient range sketch: 2e-3 relative on one entry of one seed).
  tx = flora_optax.flora_momentum(RANK, 0.8, kappa=3, sketch="two_sided", axes=AXES,
                                  emit="compressed")
  state = tx.init(PARAMS)
  ema = reference.ema
  refs = {name: ema([g[name] for g in grads], 0.8) for name in PARAMS}
  for t, g in enumerate(grads):
    out, state = jax.jit(tx.update)(g, state)
    for name in PARAMS:
      scale = np.abs(refs[name][t]).max()
      np.testing.assert_allclose(out[name], refs[name][t], atol=2e-4 * scale,
                                 err_msg=f"{name} step {t}")
  assert int(state.cycle) == 3


def test_two_sided_error_is_near_the_best_rank_k_error(rng):
  """For a full-rank matrix with a decaying spectrum the mean squared error stays within the
  bound of Tropp et al. (2017, Thm 4.3) for X̂ = Q (ΨQ)⁺ W with Gaussian sketches:
  E‖X − X̂‖² ≤ (1 + f(k, l)) · min_{ρ < k-1} (1 + f(ρ, k)) τ²_{ρ+1}, f(s, t) = s / (t - s - 1),
  τ_{j} the energy beyond the best rank-j approximation."""
  n, m = 96, 64
  spectrum = 0.7 ** np.arange(m)
  q1, _ = np.linalg.qr(rng.standard_normal((n, m)))
  q2, _ = np.linalg.qr(rng.standard_normal((m, m)))
  x = (q1 * spectrum) @ q2.T
  sketch = _sketches.TwoSided(RANK, "gaussian", jnp.float32, jax.lax.Precision.HIGHEST)
  k, l = sketch.sizes(n, m)
  f = lambda s, t: s / (t - s - 1)  # noqa: E731
  bound = (1 + f(k, l)) * min((1 + f(rho, k)) * np.sum(spectrum[rho:] ** 2)
                              for rho in range(k - 1))
  leaf = jax.eval_shape(lambda: flora_optax.flora_momentum(RANK, sketch="two_sided").init(
      {"w": jnp.zeros((n, m))})).compressed_mu["w"].leaf
  errors = []
  for seed in range(20):
    draws = sketch.draw(jax.random.key(seed), leaf)
    back = sketch.decompress(sketch.compress(jnp.asarray(x, jnp.float32), draws, leaf), draws,
                             leaf)
    errors.append(np.linalg.norm(np.asarray(back, np.float64) - x))
  # 20 draws estimate the expectation; 1.5x leaves room for their spread.
  assert np.mean(np.square(errors)) <= 1.5 * bound, (np.mean(np.square(errors)), bound)
  # A Gaussian projection of the same memory is unbiased but noisy: its mean squared error is
  # ‖X‖²·(d + 1)/r (docs/spec.md), d = 64 the compressed side; the truncation's is far below.
  assert np.mean(np.square(errors)) < 0.25 * np.sum(x**2) * (m + 1) / RANK


@pytest.mark.parametrize("weight", [None, 0.1, 2.5])
@pytest.mark.parametrize("sketch,projection", [("projection", None), ("projection", "gaussian"),
                                               ("two_sided", None)])
def test_residual_emit_adds_the_part_outside_the_subspace(sketch, projection, weight, rng):
  """One step from a zero state: out = unsketch(M) + w (I - P) G, P the projector on the
  sketch's subspace (rows of A; the range of Y), w = residual_weight (1 by default). In float64
  NumPy. The default projection (DCT) takes AAᵀ = (d/r)·I instead of a solve; the Gaussian
  one solves."""
  decay = 0.9
  g = {"w": jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)}
  options = dict(sketch=sketch, projection=projection)
  tx = flora_optax.flora_momentum(RANK, decay, 10, seed=2, emit="residual",
                                  residual_weight=weight, **options)
  w = 1.0 if weight is None else weight
  out, state = tx.update(g, tx.init(g))
  plain, _ = flora_optax.flora_momentum(RANK, decay, 10, seed=2, emit="compressed",
                                        **options).update(g, tx.init(g))
  x = np.asarray(g["w"], np.float64)
  draws = flora_optax.projections(g, RANK, 0, 2, **options)["w"]
  if sketch == "projection":
    a = np.asarray(draws["a"], np.float64)            # (r, 24): the columns are compressed
    projector = a.T @ np.linalg.solve(a @ a.T, a)
    expected_extra = w * (x - x @ projector)
  else:
    y = np.asarray(state.compressed_mu["w"].parts["range"], np.float64)
    q, _ = np.linalg.qr(y)
    expected_extra = w * (x - q @ (q.T @ x))
  np.testing.assert_allclose(np.asarray(out["w"]) - np.asarray(plain["w"]), expected_extra,
                             rtol=1e-3, atol=1e-4)


def test_residual_weight_is_checked():
  for weight in (-0.5, float("nan"), "1", True):
    with pytest.raises(ValueError, match="residual_weight must be a finite number >= 0"):
      flora_optax.flora_momentum(RANK, residual_weight=weight)
  with pytest.raises(ValueError, match="residual_weight applies to emit='residual' only"):
    flora_optax.flora_momentum(RANK, emit="compressed", residual_weight=0.1)
  with pytest.raises(ValueError, match="residual_weight"):
    flora_optax.flora_adafactor(1e-3, RANK, momentum=None, residual_weight=0.1)


def test_dct_rows_are_orthogonal_and_unbiased():
  for d, r in ((40, 10), (50257, 64)):
    a = np.asarray(flora_optax.projections({"w": jnp.zeros((8, d))}, r, 3, side="cols",
                                           projection="dct")["w"]["a"], np.float64)
    np.testing.assert_allclose(a @ a.T, d / r * np.eye(r), atol=1e-5 * d)
  grams = [np.asarray(flora_optax.projections({"w": jnp.zeros((8, 40))}, 10, c, side="cols",
                                              projection="dct")["w"]["a"], np.float64)
           for c in range(300)]
  mean = np.mean([a.T @ a for a in grams], axis=0)
  assert np.abs(mean - np.eye(40)).max() < 0.25


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_sided_runs_jitted_without_retrace(dtype, rng):
  tx = optax.chain(flora_optax.flora_momentum(RANK, 0.9, 5, sketch="two_sided", axes=AXES,
                                              dtype=dtype), optax.scale(-0.1))
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for _ in range(12):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), PARAMS)
    out, state = step(g, state, PARAMS)
  assert step._cache_size() == 1
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((out, state)))
  assert state[0].compressed_mu["tall"].parts["range"].dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("sketch", ["projection", "two_sided"])
@pytest.mark.parametrize("side", ["smaller", "larger"])
def test_compress_with_a_scale_is_compress_of_the_scaled_leaf(sketch, side, rng):
  """compress(X, scale=(a, b)) == compress(diag(a) X diag(b)) on every leaf's matrix view (a
  stack included), in float64 NumPy; either scale may be absent."""
  if sketch == "two_sided" and side != "smaller":
    pytest.skip("the two-sided sketch has no side")
  state = flora_optax.flora_momentum(RANK, sketch=sketch, side=side, axes=AXES).init(PARAMS)
  for name, p in PARAMS.items():
    node = state.compressed_mu[name]
    if p.ndim == 1:
      continue
    leaf, sk = node.leaf, node.sketch
    draws = sk.draw(jax.random.key(3), leaf)
    x = jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
    rows = jnp.asarray(rng.uniform(0.1, 4.0, leaf.batch_shape + (leaf.n,)), jnp.float32)
    cols = jnp.asarray(rng.uniform(0.1, 4.0, leaf.batch_shape + (leaf.m,)), jnp.float32)
    for scale in ((rows, cols), (rows, None), (None, cols)):
      view = np.asarray(leaf.to_matrix(x), np.float64)
      if scale[0] is not None:
        view = view * np.asarray(rows)[..., :, None]
      if scale[1] is not None:
        view = view * np.asarray(cols)[..., None, :]
      want = sk.compress(leaf.from_matrix(jnp.asarray(view, jnp.float32)), draws, leaf)
      got = sk.compress(x, draws, leaf, scale)
      for part in want:
        np.testing.assert_allclose(got[part], want[part], rtol=0,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want[part]))))
