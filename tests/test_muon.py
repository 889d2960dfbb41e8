"""flora_muon: optax.contrib.muon with its momentum kept in a Flora sketch."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

import flora_optax
from tests.conftest import buffer, trajectory

# Matrices (wide, tall), a vector and a conv kernel (Adam's by default), a scanned stack that
# dimension numbers make Muon's (3 matrices of 12x20).
SHAPES = {"wide": (24, 40), "tall": (48, 16), "bias": (16,), "stack": (3, 12, 20),
          "conv": (3, 3, 4, 10)}
DIMS = {"wide": MuonDimensionNumbers(), "tall": MuonDimensionNumbers(), "bias": None,
        "stack": MuonDimensionNumbers(reduction_axis=1, output_axis=2), "conv": None}
AXES = {"wide": flora_optax.MatrixAxes(0, 1), "tall": flora_optax.MatrixAxes(0, 1), "bias": None,
        "stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0), "conv": None}
STEPS = 20


def tree(rng, shapes=SHAPES):
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def max_relative_error(ours, theirs):
  """max over steps and leaves of max|ours - theirs| / max|theirs|."""
  return max(float(jnp.max(jnp.abs(o - t)) / jnp.max(jnp.abs(t)))
             for a, b in zip(ours, theirs) for o, t in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Each variant with one of the two ways of leaving the momentum uncompressed: a mask that
# compresses nothing, or a rank at or above every leaf's compressed side.
VARIANTS = {
    "nesterov": dict(nesterov=True, rank=4, mask=False),
    "plain": dict(nesterov=False, rank=64, muon_weight_dimension_numbers=None),
    "options": dict(nesterov=True, rank=4, mask=False, adaptive=True, consistent_rms=0.2,
                    preconditioning="aol", ns_coeffs="dion", beta=0.9,
                    adam_learning_rate=3e-3, adam_weight_decay=0.01),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_uncompressed_is_optax_muon(variant, rng):
  """20 jitted steps on the optimizers' own trajectories, with weight decay (masked) and the
  Adam fallback (the vector and the conv kernel; "plain" uses optax's default rule, so the
  stack is Adam's there); max relative error measured: 0.0 (nesterov, options) and 1.7e-6
  (plain)."""
  params, grads = tree(rng), [tree(rng) for _ in range(STEPS)]
  options = dict(weight_decay=0.1, weight_decay_mask={"wide": True, "tall": False,
                                                      "bias": False, "stack": True,
                                                      "conv": False}, **VARIANTS[variant])
  options.setdefault("muon_weight_dimension_numbers", DIMS)
  ours, state = trajectory(flora_optax.flora_muon(0.02, **options), params, grads)
  options.pop("rank"), options.pop("mask", None)
  if options.get("ns_coeffs") == "dion":  # optax.contrib.scale_by_muon takes no preset name
    options["ns_coeffs"] = flora_optax.muon.NS_PRESETS["dion"]
  theirs, _ = trajectory(optax.contrib.muon(0.02, **options), params, grads)
  error = max_relative_error(ours, theirs)
  print(f"{variant}: max relative error {error:.2e}")
  assert error <= 1e-5
  momentum = state.inner_states["muon"].inner_state[0]
  assert not any(isinstance(x, flora_optax.Compressed) for x in jax.tree.leaves(
      momentum.compressed_mu, is_leaf=lambda x: isinstance(x, flora_optax.Compressed)))


def test_axes_spelling_builds_the_same_state(rng):
  """`axes` written with MatrixAxes builds the same state (layouts included) as the
  MuonDimensionNumbers tree."""
  params = tree(rng)
  by_dims = jax.eval_shape(flora_optax.flora_muon(0.02, 4, muon_weight_dimension_numbers=DIMS
                                                  ).init, params)
  by_axes = jax.eval_shape(flora_optax.flora_muon(0.02, 4, axes=AXES).init, params)
  assert jax.tree.structure(by_axes) == jax.tree.structure(by_dims)


def test_compressed_state_is_the_orthogonalized_view(rng):
  tx = flora_optax.flora_muon(0.02, 4, muon_weight_dimension_numbers=DIMS)
  state = tx.init(tree(rng))
  momentum = state.inner_states["muon"].inner_state[0]
  assert isinstance(momentum, flora_optax.FloraMomentumState)
  mu = momentum.compressed_mu
  # smaller side compressed: wide (4, 40), tall (48, 4), each of the 3 stacked 12x20: (4, 20)
  assert buffer(mu["wide"]).shape == (4, 40)
  assert buffer(mu["tall"]).shape == (48, 4)
  assert buffer(mu["stack"]).shape == (3, 4, 20)
  adam = state.inner_states["adam"].inner_state[0]
  assert adam.mu["bias"].shape == (16,) and adam.mu["conv"].shape == (3, 3, 4, 10)
  # mu_dtype, as in optax: Adam's first moment, and the Muon momentum's storage dtype.
  state = jax.eval_shape(flora_optax.flora_muon(0.02, 4, mu_dtype=jnp.bfloat16).init,
                         tree(rng))
  assert buffer(state.inner_states["muon"].inner_state[0].compressed_mu["wide"]).dtype == (
      jnp.bfloat16)
  assert state.inner_states["adam"].inner_state[0].mu["bias"].dtype == jnp.bfloat16


@pytest.mark.parametrize("options", [dict(), dict(sketch="two_sided", dtype="bfloat16"),
                                     dict(sketch="factors")])
def test_trains_a_regression(options, rng):
  """Least squares on a 64x96 weight at rank 16, 60 steps: measured 0.075 of the start loss
  for optax.contrib.muon, 0.135 for the projection, 0.107 for the two-sided sketch."""
  x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32) / 8
  params = {"w": jnp.zeros((64, 96)), "b": jnp.zeros(96)}
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - x @ target) ** 2)  # noqa: E731
  tx = flora_optax.flora_muon(0.02, 16, kappa=20, **options)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  start = loss(params)
  for _ in range(60):
    params, state = step(params, state)
  assert loss(params) < 0.25 * start


@pytest.mark.parametrize("emit", ["residual", "compressed"])
def test_projection_norm_does_not_reach_the_update(rng, emit):
  """Without nesterov the update is O(decompressed momentum): scaling the gradients by 1000
  (as the projection's decompression inflates them) leaves the Muon update unchanged."""
  params, grad = tree(rng, {"wide": (24, 40)}), tree(rng, {"wide": (24, 40)})
  tx = flora_optax.flora_muon(0.02, 4, nesterov=False, kappa=None, emit=emit)
  update = jax.jit(tx.update)
  small, _ = update(grad, tx.init(params), params)
  large, _ = update(jax.tree.map(lambda g: 1000 * g, grad), tx.init(params), params)
  np.testing.assert_allclose(large["wide"], small["wide"], rtol=1e-4, atol=1e-7)
  # Orthogonalized: about lr·sqrt(40/24) (the shape factor) in spectral norm; with
  # emit="compressed" of rank 4 (the momentum is a rank-4 decompression), with the residual
  # of full rank (the current gradient's part outside the sketch is added).
  s = np.linalg.svd(np.asarray(small["wide"]), compute_uv=False)
  assert 0.02 * 0.5 < s.max() < 0.02 * 1.5 * np.sqrt(40 / 24)
  if emit == "compressed":
    assert s[4] < 1e-4 * s[0]
  else:
    assert s[4] > 1e-2 * s[0]


class Model(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_optimizer_with_inject_hyperparams(rng):
  x = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
  y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((16, 4)), jnp.float32) / 4)
  factory = optax.inject_hyperparams(flora_optax.flora_muon, static_args=("rank",))
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, factory(learning_rate=0.02, rank=8, kappa=20,
                                           adam_learning_rate=1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(100)]
  assert losses[-1] < 0.2 * losses[0], losses[::20]
  momentum = optimizer.opt_state.inner_state.inner_states["muon"].inner_state[0]
  assert buffer(momentum.compressed_mu["l1"]["kernel"]).shape == (8, 64)


def test_inject_hyperparams_traces_the_learning_rate(rng):
  """One compiled update; the learning rate is state: doubling it doubles every update
  exactly (the Muon and the Adam leaves alike), zero gives zero."""
  shapes = {k: SHAPES[k] for k in ("wide", "bias")}
  params, grads = tree(rng, shapes), tree(rng, shapes)
  factory = optax.inject_hyperparams(flora_optax.flora_muon, static_args=("rank",))
  tx = factory(learning_rate=0.02, rank=4)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"learning_rate", "beta", "ns_steps", "kappa"}
  update = jax.jit(tx.update)
  base, _ = update(grads, state, params)
  for lr, factor in ((0.04, 2.0), (0.0, 0.0)):
    state.hyperparams["learning_rate"] = jnp.asarray(lr)
    scaled, _ = update(grads, state, params)
    for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(base)):
      np.testing.assert_array_equal(a, factor * b)


def test_state_shardings():
  """The Muon momentum is a flora_momentum state, so state_shardings places it: the
  uncompressed side keeps the parameter's sharding, Adam's buffers take the parameter's."""
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  params = {"tall": jnp.zeros((32, 16)), "bias": jnp.zeros((16,)),
            "stack": jnp.zeros((3, 32, 16))}
  specs = {"tall": P("data", None), "bias": P("model"), "stack": P(None, "data", "model")}
  tx = flora_optax.flora_muon(0.02, 4, muon_weight_dimension_numbers={
      "tall": MuonDimensionNumbers(), "bias": None, "stack": MuonDimensionNumbers(1, 2)})
  shardings = flora_optax.state_shardings(
      tx, params, {k: NamedSharding(mesh, v) for k, v in specs.items()})
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(tx.init, params))
  mu = shardings.inner_states["muon"].inner_state[0].compressed_mu
  assert buffer(mu["tall"]).spec == P("data", None)
  assert buffer(mu["stack"]).spec == P(None, "data", None)
  assert shardings.inner_states["adam"].inner_state[0].mu["bias"].spec == P("model")
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert buffer(state.inner_states["muon"].inner_state[0].compressed_mu["tall"]).shape == (32, 4)


def test_orbax_resume_is_bit_identical(tmp_path, rng):
  """Saved before a resample (kappa=3, saved at count 4), restored into an abstract state,
  continued: the same updates as the uninterrupted run, bit for bit."""
  shapes = {k: SHAPES[k] for k in ("wide", "bias")}
  params, grads = tree(rng, shapes), [tree(rng, shapes) for _ in range(8)]
  tx = flora_optax.flora_muon(0.02, 4, kappa=3, muon_weight_dimension_numbers={
      k: DIMS[k] for k in shapes})
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads[:4]:
    _, state = update(g, state, params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
  for g in grads[4:]:
    expected, state = update(g, state, params)
    got, restored = update(g, restored, params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)


def test_an_empty_matrix_steps_and_leaves_the_others_alone(rng):
  # optax.contrib.muon divides by the fan-in of an empty matrix; a model with a zero-width
  # layer (a pruned head, say) should still train.
  params = {"wide": jnp.asarray(rng.standard_normal((24, 40)), jnp.float32),
            "empty": jnp.zeros((0, 16))}
  grads = [tree(rng, {k: v.shape for k, v in params.items()}) for _ in range(3)]
  tx = flora_optax.flora_muon(1e-2, 4)
  outs, state = trajectory(tx, params, grads)
  alone, _ = trajectory(tx, {"wide": params["wide"]}, [{"wide": g["wide"]} for g in grads])
  assert outs[-1]["empty"].shape == (0, 16)
  np.testing.assert_array_equal(outs[-1]["wide"], alone[-1]["wide"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_errors_name_the_problem():
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
  with pytest.raises(ValueError, match=r"rank must be an int in \[1, .*got rank=0"):
    flora_optax.flora_muon(0.02, 0)
  with pytest.raises(TypeError, match="rank=2.5"):
    flora_optax.flora_muon(0.02, 2.5)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got beta=1.0"):
    flora_optax.flora_muon(0.02, 4, beta=1.0)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['sketchh'\]"):
    flora_optax.flora_muon(0.02, 4, sketchh="two_sided")
  with pytest.raises(ValueError, match="preconditioning must be one of"):
    flora_optax.flora_muon(0.02, 4, preconditioning="newton")
  with pytest.raises(ValueError, match=r"ns_coeffs must have shape \(3,\) or \(steps, 3\), got "
                                       r"shape \(2,\)"):
    flora_optax.flora_muon(0.02, 4, ns_coeffs=(1.0, 2.0))
  with pytest.raises(ValueError, match="preset"):
    flora_optax.flora_muon(0.02, 4, ns_coeffs="polar")
  with pytest.raises(ValueError, match="ns_coeffs has 5 rows.*more than ns_steps=4"):
    flora_optax.flora_muon(0.02, 4, ns_coeffs="dion", ns_steps=4)
  with pytest.raises(ValueError, match="not both"):
    flora_optax.flora_muon(0.02, 4, axes={"w": flora_optax.MatrixAxes()},
                           muon_weight_dimension_numbers={"w": MuonDimensionNumbers()})
  with pytest.raises(ValueError, match=r"params\['b'\] \(8,\) has 1 axes"):
    flora_optax.flora_muon(0.02, 4, muon_weight_dimension_numbers=MuonDimensionNumbers()).init(
        params)
  with pytest.raises(ValueError, match=r"output_axis axis 2 for params\['w'\] \(16, 8\)"):
    flora_optax.flora_muon(0.02, 4, muon_weight_dimension_numbers={
        "w": MuonDimensionNumbers(0, 2), "b": None}).init(params)
  with pytest.raises(ValueError, match=r"scale_by_flora_muon orthogonalizes every leaf, but "
                                       r"params\['b'\] \(8,\)"):
    flora_optax.scale_by_flora_muon(4).init(params)
  with pytest.raises(ValueError, match=r"mask asks to compress params\['w'\] \(16, 8\), but "
                                       r"rank=8"):
    flora_optax.flora_muon(0.02, 8, mask={"w": True, "b": False}).init(params)
