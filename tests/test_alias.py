"""flora_adafactor: the same chain as optax.adafactor, with Flora momentum and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from tests.conftest import trajectory


def _tree(rng):
  return {"w": jnp.asarray(rng.standard_normal((64, 160)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((160, 24)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((24,)), jnp.float32)}


def _assert_same(a, b, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def test_without_momentum_is_optax_adafactor(rng):
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(5)]
  ours, _ = trajectory(flora_optax.flora_adafactor(1e-2, 8, momentum=None), params, grads)
  theirs, _ = trajectory(optax.adafactor(1e-2), params, grads)
  _assert_same(ours, theirs)


def test_uncompressed_after_param_scale_is_optax_adafactor_with_momentum(rng):
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(6)]
  ours, _ = trajectory(flora_optax.flora_adafactor(
      1e-2, 8, momentum=0.9, mask=False, momentum_position="after_param_scale",
      weight_decay_rate=1e-3), params, grads)
  theirs, _ = trajectory(optax.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3), params,
                          grads)
  _assert_same(ours, theirs)


def test_uncompressed_accumulation_is_multisteps(rng):
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(8)]
  ours, _ = trajectory(flora_optax.flora_accumulate(flora_optax.flora_adafactor(
      1e-2, 8, momentum=0.9, mask=False, momentum_position="after_param_scale"), 4, 8,
      mask=False), params, grads)
  theirs, _ = trajectory(optax.MultiSteps(optax.adafactor(1e-2, momentum=0.9), 4), params,
                          grads)
  _assert_same(ours, theirs)


@pytest.mark.parametrize("position", ["after_factored_rms", "after_param_scale"])
@pytest.mark.parametrize("accumulate_every,rank,target", [(None, 16, 0.2), (2, 32, 0.3)])
def test_trains_a_regression(position, accumulate_every, rank, target, rng):
  """Measured on this problem: 0.02 of the start loss (momentum only, rank 16 of 64) and 0.12
  (momentum and accumulation both compressed at rank 32: their noise compounds)."""
  x = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
  true_w = jnp.asarray(rng.standard_normal((64, 160)), jnp.float32) / 8
  params = {"w": jnp.zeros((64, 160))}
  loss = lambda p: jnp.mean((x @ p["w"] - x @ true_w) ** 2)  # noqa: E731
  tx = flora_optax.flora_adafactor(3e-2, rank, momentum=0.9, kappa=10,
                                   momentum_position=position,
                                   multiply_by_parameter_scale=False, min_dim_size_to_factor=32)
  if accumulate_every:
    tx = flora_optax.flora_accumulate(tx, accumulate_every, rank)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  start = loss(params)
  for _ in range(200):
    params, state = step(params, state)
  assert loss(params) < target * start
  compressed = jax.tree.leaves(state)
  assert not any(leaf.shape == (64, 160) for leaf in compressed)


def test_inject_hyperparams_with_traced_learning_rate_and_momentum(rng):
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(4)]
  factory = optax.inject_hyperparams(flora_optax.flora_adafactor,
                                     static_args=("rank", "kappa", "seed"))
  tx = factory(learning_rate=1e-2, rank=8, momentum=0.9, kappa=2, seed=1)
  ours, state = trajectory(tx, params, grads)
  plain, _ = trajectory(flora_optax.flora_adafactor(1e-2, 8, momentum=0.9, kappa=2, seed=1),
                         params, grads)
  _assert_same(ours, plain)
  assert set(state.hyperparams) >= {"learning_rate", "momentum"}
  # Changing the injected learning rate changes the update, without a retrace.
  update = jax.jit(tx.update)
  u1, _ = update(grads[0], state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-2, jnp.float32)
  u2, _ = update(grads[0], state, params)
  np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-5, atol=1e-7)
  assert update._cache_size() == 1


def test_accumulate_with_skip(rng):
  params = _tree(rng)
  tx = flora_optax.flora_accumulate(flora_optax.flora_adafactor(1e-2, 8), 2, 8,
                                    should_skip_update_fn=optax.skip_not_finite)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _tree(rng))
  _, state2 = tx.update(bad, state, params)
  assert int(state2.mini_step) == 0 and int(state2.skip_state["num_not_finite"]) > 0


def test_accumulate_every_still_works_with_a_deprecation_warning(rng):
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(4)]
  with pytest.warns(DeprecationWarning, match="flora_accumulate"):
    old = flora_optax.flora_adafactor(1e-2, 8, accumulate_every=2,
                                      should_skip_update_fn=optax.skip_not_finite)
  new = flora_optax.flora_accumulate(flora_optax.flora_adafactor(1e-2, 8), 2, 8,
                                     should_skip_update_fn=optax.skip_not_finite)
  _assert_same(trajectory(old, params, grads)[0], trajectory(new, params, grads)[0])


def test_bad_options():
  with pytest.raises(ValueError, match="momentum_position"):
    flora_optax.flora_adafactor(1e-2, 8, momentum_position="last")
  with pytest.raises(ValueError, match="should_skip_update_fn only applies"):
    flora_optax.flora_adafactor(1e-2, 8, should_skip_update_fn=optax.skip_not_finite)
  with pytest.raises(ValueError, match="momentum must be in"):
    flora_optax.flora_adafactor(1e-2, 8, momentum=1.0)
  with pytest.raises(ValueError, match="rank=0"):
    flora_optax.flora_adafactor(1e-2, 0)
  with pytest.raises(TypeError, match="unknown option"):
    flora_optax.flora_adafactor(1e-2, 8, accumulate_rnak=4)


# ------------------------------------------------ the factored preconditioner folded in


def _chain_reference(rank, kappa, min_dim, factored=True, lr=1e-2, **options):
  """flora_adafactor's default chain written out from its public pieces (no fold)."""
  return optax.chain(
      optax.scale_by_factored_rms(factored, 0.8, 0, min_dim, 1e-30),
      flora_optax.flora_momentum(rank, 0.9, kappa, 0, **options),
      optax.clip_by_block_rms(1.0), optax.scale_by_learning_rate(lr, flip_sign=False),
      optax.scale_by_param_block_rms(), optax.scale(-1))


def _factored_tree(rng, dtype=jnp.float32):
  # Both dims of w and v reach min_dim_size_to_factor=24; t has 3 axes; b is a vector.
  scales = {"w": (40, 1), "v": (1, 56), "t": (1, 1, 40), "b": (1,)}
  shapes = {"w": (40, 56), "v": (72, 56), "t": (3, 32, 40), "b": (56,)}
  return {k: jnp.asarray(rng.standard_normal(s) * rng.uniform(0.1, 5.0, scales[k]), dtype)
          for k, s in shapes.items()}


@pytest.mark.parametrize("options", [
    {}, {"projection": "orthogonal"}, {"projection": "rademacher"}, {"projection": "dct"},
    {"side": "larger"}, {"side": "rows"}, {"side": "cols"}, {"transfer": "unbiased"},
    {"mask": {"w": True, "v": False, "t": True, "b": False}},
    {"axes": {"w": flora_optax.MatrixAxes(rows=1, cols=0), "v": None, "b": None,
              "t": flora_optax.MatrixAxes(batch=0, rows=2, cols=1)}}, {"sketch": "two_sided"},
    {"emit": "residual"}, {"dtype": "bfloat16"}])
def test_folded_preconditioner_matches_the_plain_chain(options, rng):
  """flora_adafactor compresses diag(a)·G·diag(b) without forming it; the chain that forms
  it (optax's scale_by_factored_rms, then flora_momentum) must give the same updates, the
  same state structure and the same state, through resamples (kappa=3)."""
  params = _factored_tree(rng)
  grads = [_factored_tree(rng) for _ in range(7)]
  ours_tx = flora_optax.flora_adafactor(1e-2, 8, kappa=3, min_dim_size_to_factor=24, **options)
  ref_tx = _chain_reference(8, 3, 24, **options)
  ours, ours_state = trajectory(ours_tx, params, grads)
  ref, ref_state = trajectory(ref_tx, params, grads)
  assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
  # bf16 buffers: a rounding-level difference before the stochastic rounding may flip it.
  tol = 2e-2 if options.get("dtype") == "bfloat16" else 1e-5
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * float(jnp.max(jnp.abs(y))))
  for x, y in zip(jax.tree.leaves(ours_state), jax.tree.leaves(ref_state)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(1e-30, float(np.max(np.abs(y)))))


@pytest.mark.parametrize("kwargs", [{"factored": False}, {"min_dim_size_to_factor": 4096},
                                    {"momentum_position": "after_param_scale"}])
def test_unfolded_configurations_match_the_plain_chain(kwargs, rng):
  params = _factored_tree(rng)
  grads = [_factored_tree(rng) for _ in range(4)]
  min_dim = kwargs.get("min_dim_size_to_factor", 24)
  ours_tx = flora_optax.flora_adafactor(1e-2, 8, kappa=2, **{"min_dim_size_to_factor": 24,
                                                                **kwargs})
  if "momentum_position" in kwargs:
    ref_tx = optax.chain(optax.scale_by_factored_rms(True, 0.8, 0, 24, 1e-30),
                         optax.clip_by_block_rms(1.0),
                         optax.scale_by_learning_rate(1e-2, flip_sign=False),
                         optax.scale_by_param_block_rms(),
                         flora_optax.flora_momentum(8, 0.9, 2, 0), optax.scale(-1))
  else:
    ref_tx = _chain_reference(8, 2, min_dim, factored=kwargs.get("factored", True))
  ours, _ = trajectory(ours_tx, params, grads)
  ref, _ = trajectory(ref_tx, params, grads)
  _assert_same(ours, ref)


def test_bfloat16_params_are_not_folded(rng):
  """bf16 leaves: the matmul would read a float32 copy of the gradient (a full-size pass that
  applies the scales for free), so flora_adafactor forms the scaled update as the plain chain
  does, and matches it to float rounding."""
  params = _factored_tree(rng, jnp.bfloat16)
  grads = [_factored_tree(rng, jnp.bfloat16) for _ in range(3)]
  ours, _ = trajectory(flora_optax.flora_adafactor(1e-2, 8, min_dim_size_to_factor=24),
                       params, grads)
  ref, _ = trajectory(_chain_reference(8, 1000, 24), params, grads)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert x.dtype == y.dtype == jnp.bfloat16
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6 * float(np.max(np.abs(y))))


def test_folded_preconditioner_under_inject_hyperparams(rng):
  params = _factored_tree(rng)
  grads = [_factored_tree(rng) for _ in range(3)]
  factory = optax.inject_hyperparams(flora_optax.flora_adafactor,
                                     static_args=("rank", "kappa", "min_dim_size_to_factor"))
  tx = factory(learning_rate=1e-2, rank=8, momentum=0.9, kappa=2, decay_rate=0.7,
               min_dim_size_to_factor=24)
  ours, _ = trajectory(tx, params, grads)
  plain, _ = trajectory(flora_optax.flora_adafactor(1e-2, 8, kappa=2, decay_rate=0.7,
                                                    min_dim_size_to_factor=24), params, grads)
  _assert_same(ours, plain)


def test_momentum_options_without_momentum_are_refused():
  with pytest.raises(ValueError, match="emit would do nothing"):
    flora_optax.flora_adafactor(1e-2, 8, momentum=None, emit="residual")
  with pytest.raises(ValueError, match="side, transfer would do nothing"):
    flora_optax.flora_adafactor(1e-2, 8, momentum=None, transfer="unbiased", side="larger")
  # With the deprecated accumulation the compression options still apply to it.
  with pytest.warns(DeprecationWarning):
    flora_optax.flora_adafactor(1e-2, 8, momentum=None, accumulate_every=2, side="larger")
