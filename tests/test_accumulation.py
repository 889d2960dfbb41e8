"""flora_accumulate and compressed_mean against Algorithm 1, optax.MultiSteps, and statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from tests import reference
from tests.conftest import buffer, AXES, RANK, SHAPES, VIEWS, random_tree, run_transform, side_of


def _projector(params, side, projection, transform="accumulate", seed=0):
  @functools.cache
  def at(cycle):
    return flora_optax.projections(params, RANK, cycle, seed, transform=transform, axes=AXES,
                                   side=side, projection=projection)
  return at


@pytest.mark.parametrize("projection", ["gaussian", "orthogonal", "rademacher"])
@pytest.mark.parametrize("side", ["smaller", "larger"])
@pytest.mark.parametrize("schedule", ["int", "function"])
def test_matches_float64_reference(projection, side, schedule, params, rng):
  every_k = (lambda step: 3) if schedule == "int" else (lambda step: 2 + step % 2)
  k_arg = 3 if schedule == "int" else (lambda step: 2 + step % 2)
  grads = [random_tree(rng) for _ in range(10)]
  tx = flora_optax.flora_accumulate(optax.identity(), k_arg, RANK, seed=5, axes=AXES,
                                    side=side, projection=projection)
  outs, state = run_transform(tx, grads, params)
  proj = _projector(params, side, projection, seed=5)
  for name, view in VIEWS.items():
    ref = reference.accumulate([g[name] for g in grads], view, side_of(view, side),
                               lambda c: proj(c)[name], every_k)
    for t, (o, r) in enumerate(zip(outs, ref)):
      np.testing.assert_allclose(o[name], r, rtol=1e-4, atol=1e-5 * max(np.abs(r).max(), 1),
                                 err_msg=f"{name} micro-step {t}")
  # The vector leaf is never compressed: it is MultiSteps' exact mean.
  multi = optax.MultiSteps(optax.identity(), k_arg)
  theirs, _ = run_transform(multi, grads, params)
  for o, t in zip(outs, theirs):
    np.testing.assert_allclose(o["bias"], t["bias"], rtol=1e-6, atol=1e-7)


def test_uncompressed_matches_optax_multisteps(params, rng):
  grads = [random_tree(rng) for _ in range(9)]
  inner = optax.adafactor(1e-2, min_dim_size_to_factor=8, momentum=0.9)
  ours, ours_state = run_transform(flora_optax.flora_accumulate(inner, 3, RANK, mask=False), grads,
                          params)
  theirs, theirs_state = run_transform(optax.MultiSteps(inner, 3), grads, params)
  for o, t in zip(ours, theirs):
    for k in SHAPES:
      np.testing.assert_allclose(o[k], t[k], rtol=1e-5, atol=1e-7)
  assert int(ours_state.gradient_step) == int(theirs_state.gradient_step) == 3
  assert bool(flora_optax.has_updated(ours_state))


def test_k_different_gradients_equal_k_copies_of_their_mean(params, rng):
  k = 4
  grads = [random_tree(rng) for _ in range(k)]
  mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
  tx = flora_optax.flora_accumulate(optax.identity(), k, RANK, axes=AXES)
  outs, _ = run_transform(tx, grads, params)
  outs_mean, _ = run_transform(tx, [mean] * k, params)
  for name in SHAPES:
    np.testing.assert_allclose(outs[-1][name], outs_mean[-1][name], rtol=1e-4, atol=1e-5)
    for t in range(k - 1):
      assert np.all(np.asarray(outs[t][name]) == 0)


def test_each_cycle_draws_a_new_projection(params):
  proj = dict(axes=AXES, sketch="projection")   # the accumulation's default is two-sided
  a0 = flora_optax.projections(params, RANK, 0, transform="accumulate", **proj)
  a1 = flora_optax.projections(params, RANK, 1, transform="accumulate", **proj)
  m0 = flora_optax.projections(params, RANK, 0, transform="momentum", **proj)
  again = flora_optax.projections(params, RANK, 0, transform="accumulate", **proj)
  for name in VIEWS:
    assert not np.allclose(a0[name]["a"], a1[name]["a"])
    assert not np.allclose(a0[name]["a"], m0[name]["a"])  # momentum and accumulation never share
    np.testing.assert_array_equal(a0[name]["a"], again[name]["a"])
  assert a0["bias"] is None
  # The leaves of one cycle differ from each other too (keys folded with the leaf's path).
  same_shape = flora_optax.projections({"a": jnp.zeros((8, 16)), "b": jnp.zeros((8, 16))}, 4, 0)
  assert not np.allclose(same_shape["a"]["a"], same_shape["b"]["a"])


@pytest.mark.parametrize("projection,noise", [
    ("gaussian", lambda d, r: (d + 1) / r),
    ("orthogonal", lambda d, r: d / r - 1),
    ("rademacher", lambda d, r: (d - 1) / r),
])
def test_unbiased_at_the_one_over_sqrt_cycles_rate(projection, noise, rng):
  """Averaging one-cycle outputs over N fresh projections converges to G like 1/sqrt(N).

  For one row g, E‖g AᵀA − g‖² = ‖g‖²·noise(d, r) (docs/spec.md), so the mean of N independent
  decompressions has relative error ≈ sqrt(noise / N).
  """
  n, d, r = 16, 48, 8
  g = {"w": jnp.asarray(rng.standard_normal((n, d)), jnp.float32)}
  tx = flora_optax.flora_accumulate(optax.identity(), 1, r, side="cols", projection=projection)
  state = tx.init(g)

  def body(state, _):
    out, state = tx.update(g, state)
    return state, out["w"]

  _, outs = jax.lax.scan(body, state, None, length=1600)
  outs = np.asarray(outs, np.float64)
  errors = {}
  for cycles in (100, 400, 1600):
    mean = outs[:cycles].mean(axis=0)
    errors[cycles] = np.linalg.norm(mean - g["w"]) / np.linalg.norm(g["w"])
    expected = np.sqrt(noise(d, r) / cycles)
    assert 0.7 * expected < errors[cycles] < 1.3 * expected, (cycles, errors[cycles], expected)
  assert 0.15 < errors[1600] / errors[100] < 0.4  # 1/sqrt(16) = 0.25


def test_skip_non_finite_micro_batch_leaves_state_unchanged(params, rng):
  tx = flora_optax.flora_accumulate(optax.sgd(0.1), 3, RANK, axes=AXES,
                                    should_skip_update_fn=optax.skip_not_finite)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(random_tree(rng), state, params)
  bad = random_tree(rng)
  bad["wide"] = bad["wide"].at[0, 0].set(jnp.inf)
  out, skipped = update(bad, state, params)
  for a, b in zip(jax.tree.leaves(state.compressed_acc), jax.tree.leaves(skipped.compressed_acc)):
    np.testing.assert_array_equal(a, b)
  assert int(skipped.mini_step) == int(state.mini_step) == 1
  assert int(skipped.skip_state["num_not_finite"]) == 1
  assert all(np.all(np.asarray(o) == 0) for o in jax.tree.leaves(out))
  # Without the guard, MultiSteps' behaviour: the NaN/inf reaches the accumulator, visibly.
  plain = flora_optax.flora_accumulate(optax.sgd(0.1), 3, RANK, axes=AXES)
  _, poisoned = jax.jit(plain.update)(bad, plain.init(params), params)
  assert not all(np.all(np.isfinite(np.asarray(x)))
                 for x in jax.tree.leaves(poisoned.compressed_acc["wide"]))


def test_inner_optimizer_only_runs_on_the_last_micro_step(params, rng):
  calls = []

  def counting_update(updates, state, params=None):
    calls.append(1)
    return updates, optax.safe_increment(state)

  inner = optax.GradientTransformation(lambda p: jnp.zeros([], jnp.int32), counting_update)
  tx = flora_optax.flora_accumulate(inner, 4, RANK, axes=AXES)
  state = tx.init(params)
  for _ in range(8):
    _, state = tx.update(random_tree(rng), state, params)
  assert int(state.inner_opt_state) == 2  # ran twice in 8 micro-steps
  assert int(state.gradient_step) == 2


def test_extra_args_reach_the_inner_optimizer(params, rng):
  seen = {}

  def update(updates, state, params=None, *, value=None):
    seen["value"] = value
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: (), update)
  tx = flora_optax.flora_accumulate(inner, 1, RANK, axes=AXES)
  tx.update(random_tree(rng), tx.init(params), params, value=jnp.asarray(3.0))
  assert float(seen["value"]) == 3.0


class TestBadInput:

  @pytest.mark.parametrize("k", [0, -2])
  def test_every_k(self, k):
    with pytest.raises(ValueError, match=rf"every_k_schedule must be an int in \[1, 2\*\*31 - 1\], "
                                         rf"got every_k_schedule={k}"):
      flora_optax.flora_accumulate(optax.sgd(1.0), k, 4)

  def test_every_k_type(self):
    with pytest.raises(TypeError, match="every_k_schedule"):
      flora_optax.flora_accumulate(optax.sgd(1.0), 2.5, 4)

  def test_schedule_returning_zero(self, params):
    tx = flora_optax.flora_accumulate(optax.sgd(1.0), lambda step: 0, RANK, axes=AXES)
    with pytest.raises(ValueError, match="returned 0"):
      tx.update(params, tx.init(params), params)

  def test_rank(self):
    with pytest.raises(ValueError, match="rank=-1"):
      flora_optax.flora_accumulate(optax.sgd(1.0), 2, -1)

  def test_tree_mismatch(self):
    tx = flora_optax.flora_accumulate(optax.sgd(1.0), 2, 2)
    state = tx.init({"w": jnp.zeros((8, 8))})
    with pytest.raises(ValueError, match="does not match"):
      tx.update({"v": jnp.zeros((8, 8))}, state)

  def test_skip_fn_must_return_bool_scalar(self, params):
    tx = flora_optax.flora_accumulate(optax.sgd(1.0), 2, RANK, axes=AXES,
                                      should_skip_update_fn=lambda u, s, p: (jnp.zeros(3), ()))
    with pytest.raises(ValueError, match="bool scalar"):
      tx.update(params, tx.init(params), params)


def test_compressed_mean_microbatching_matches_reference(rng):
  w = {"w": jnp.asarray(rng.standard_normal((24, 40)), jnp.float32),
       "b": jnp.zeros((40,), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((8, 24)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((8, 40)), jnp.float32)

  def grad_fn(w, x, y):
    return jax.grad(lambda w: jnp.sum((x @ w["w"] + w["b"] - y) ** 2))(w)

  # The paper's projection (the default, two-sided, has its reference in test_sketches.py).
  acc = flora_optax.compressed_mean(RANK, cycle=7, seed=2, sketch="projection")
  micro = optax.microbatching.microbatch(grad_fn, argnums=(1, 2), microbatch_size=2,
                                         accumulator=acc)
  got = jax.jit(micro)(w, x, y)
  a = flora_optax.projections(w, RANK, 7, 2, transform="microbatch",
                              sketch="projection")["w"]["a"]
  view = reference.View((24, 40))
  per_micro = [grad_fn(w, x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
  mean_c = np.mean([reference.down(view.to(g["w"]), a, "rows") for g in per_micro], axis=0)
  np.testing.assert_allclose(got["w"], reference.up(mean_c, a, "rows"), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["b"], np.mean([g["b"] for g in per_micro], axis=0),
                             rtol=1e-5, atol=1e-6)
  # Traced cycles work (a fresh projection per optimizer step inside jit).
  traced = jax.jit(lambda c: optax.microbatching.microbatch(
      grad_fn, argnums=(1, 2), microbatch_size=2,
      accumulator=flora_optax.compressed_mean(RANK, cycle=c, seed=2, sketch="projection")
  )(w, x, y))(7)
  np.testing.assert_allclose(traced["w"], got["w"], rtol=1e-6)


# The two-sided reconstruction solves with (ΨQ)⁺, which amplifies the storage rounding
# (1.6 % to 6.8 % over the random gradients of different runs); the projection's
# decompression is linear.
@pytest.mark.parametrize("sketch,bound", [("projection", 0.01), ("two_sided", 0.1)])
def test_bfloat16_accumulator_is_the_float32_mean_to_a_bf16_ulp(params, rng, sketch, bound):
  grads = [random_tree(rng) for _ in range(16)]
  outs = {}
  for dtype in ("float32", "bfloat16"):
    tx = flora_optax.flora_accumulate(optax.identity(), 16, RANK, axes=AXES, dtype=dtype,
                                      sketch=sketch)
    result, state = run_transform(tx, grads, params)
    outs[dtype] = result[-1]
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(state.compressed_acc))
  for name in SHAPES:
    x, r = np.asarray(outs["bfloat16"][name]), np.asarray(outs["float32"][name])
    assert np.linalg.norm(x - r) / np.linalg.norm(r) < bound, name


@pytest.mark.parametrize("sketch,bound", [("projection", 0.01), ("two_sided", 0.1)])
def test_compressed_mean_with_bfloat16_carry(rng, sketch, bound):
  w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
  grad_fn = jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)))
  results = {}
  for dtype in ("float32", "bfloat16"):
    acc = flora_optax.compressed_mean(RANK, cycle=3, dtype=dtype, sketch=sketch)
    results[dtype] = jax.jit(optax.microbatching.microbatch(
        grad_fn, argnums=1, microbatch_size=2, accumulator=acc))(w, x)
  x_, r = np.asarray(results["bfloat16"], np.float64), np.asarray(results["float32"], np.float64)
  assert np.linalg.norm(x_ - r) / np.linalg.norm(r) < bound
