"""Regression tests for defects found by adversarial use (each failed on release 0.1.0)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax
from flora_optax import _sketches
from tests import reference
from tests.conftest import buffer

W = {"w": jnp.ones((16, 8))}


def test_donating_one_state_leaves_other_states_and_the_transform_usable():
  tx = flora_optax.flora_momentum(rank=4)
  step = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=1)
  kept = tx.init(W)
  _, state = step(W, tx.init(W))
  _, state = step(W, tx.init(W))          # 0.1.0: "Buffer has been deleted or donated"
  assert np.asarray(kept.key_data).shape == (2,)  # an earlier state is still alive
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), 2, rank=4)
  step = jax.jit(lambda g, s: acc.update(g, s, W), donate_argnums=1)
  step(W, acc.init(W))
  step(W, acc.init(W))


def test_lowering_k_mid_cycle_still_emits():
  tx8 = flora_optax.flora_accumulate(optax.sgd(1.0), 8, rank=4)
  state = tx8.init(W)
  for _ in range(5):
    _, state = tx8.update(W, state)
  tx4 = flora_optax.flora_accumulate(optax.sgd(1.0), 4, rank=4)
  emitted = []
  for _ in range(9):
    updates, state = tx4.update(W, state)
    emitted.append(bool(np.any(np.asarray(updates["w"]) != 0)))
  # The 6th micro-step of the cycle is past k - 1 = 3: it emits, then every 4th does.
  assert emitted == [True, False, False, False, True, False, False, False, True]


@pytest.mark.parametrize("sketch", ["projection", "two_sided", "factors"])
def test_a_changed_compressed_side_is_an_error_naming_the_leaf(sketch):
  tx = flora_optax.flora_momentum(rank=2, sketch=sketch)
  state = tx.init({"w": jnp.ones((16, 8))})
  with pytest.raises(ValueError, match=r"params\['w'\] has shape \(16, 9\).*\(16, 8\)"):
    tx.update({"w": jnp.ones((16, 9))}, state)
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), 2, rank=2, sketch=sketch)
  with pytest.raises(ValueError, match=r"params\['w'\] has shape \(16, 9\)"):
    acc.update({"w": jnp.ones((16, 9))}, acc.init({"w": jnp.ones((16, 8))}))


def test_complex_leaves_keep_their_imaginary_part(rng):
  params = {"v": jnp.zeros(6, jnp.complex64), "m": jnp.zeros((8, 6), jnp.complex64),
            "w": jnp.zeros((8, 6))}
  grads = [{k: jnp.asarray(rng.standard_normal(p.shape) + 1j * rng.standard_normal(p.shape)
                           if jnp.iscomplexobj(p) else rng.standard_normal(p.shape), p.dtype)
            for k, p in params.items()} for _ in range(4)]
  tx = flora_optax.flora_momentum(rank=2, decay=0.8)
  ema = optax.ema(0.8, debias=False)
  s, e = tx.init(params), ema.init(params)
  for g in grads:
    out, s = tx.update(g, s)
    ref, e = ema.update(g, e)
  for k in ("v", "m"):  # complex leaves are not compressed and keep optax.ema's arithmetic
    assert s.compressed_mu[k].dtype == jnp.complex64
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-6)
  assert isinstance(s.compressed_mu["w"], flora_optax.Compressed)
  with pytest.raises(ValueError, match=r"params\['m'\] \(8, 6\).*complex"):
    flora_optax.flora_momentum(rank=2, mask={"v": False, "m": True, "w": True}).init(params)


def test_adafactor_accepts_integer_leaves_like_optax():
  p = {"w": jnp.ones((8, 6)), "n": jnp.zeros((3, 4), jnp.int32)}
  tx = flora_optax.flora_adafactor(1e-2, rank=2)
  updates, _ = tx.update(p, tx.init(p), p)   # 0.1.0: ValueError about a (2, 4) buffer
  ref, _ = optax.adafactor(1e-2).update(p, optax.adafactor(1e-2).init(p), p)
  assert updates["n"].shape == ref["n"].shape


def test_float16_buffers_are_refused():
  with pytest.raises(ValueError, match="float16"):
    flora_optax.flora_momentum(rank=2, dtype="float16")
  with pytest.raises(ValueError, match="dtype"):
    flora_optax.flora_momentum(rank=2, dtype=None)


def test_traced_kappa_and_seed_work_under_inject_hyperparams():
  tx = optax.inject_hyperparams(flora_optax.flora_momentum, static_args=("rank",))(
      rank=2, decay=0.5, kappa=2, seed=3)
  plain = flora_optax.flora_momentum(2, 0.5, 2, 3)
  s, p = jax.jit(tx.init)(W), plain.init(W)
  step, plain_step = jax.jit(tx.update), jax.jit(plain.update)
  for t in range(5):
    g = {"w": jnp.full((16, 8), float(t + 1))}
    out, s = step(g, s)
    ref, p = plain_step(g, p)
    np.testing.assert_allclose(out["w"], ref["w"], rtol=1e-6)
  assert int(s.inner_state.cycle) == 2


def test_a_traced_every_k_names_static_args():
  tx = optax.inject_hyperparams(flora_optax.flora_accumulate, static_args=("rank",))(
      optax.sgd(1.0), 2, 4)
  with pytest.raises(TypeError, match="static_args=\\('every_k_schedule'"):
    jax.jit(tx.update)(W, tx.init(W), W)


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2**64, ValueError),
                                        (jnp.array(1.7), TypeError), (1.0, TypeError),
                                        ("3", TypeError), (True, TypeError)])
def test_bad_seeds(seed, error):
  with pytest.raises(error, match="seed"):
    flora_optax.flora_momentum(rank=2, seed=seed)


def test_large_seeds_are_distinct():
  draw = lambda seed: np.asarray(  # noqa: E731
      flora_optax.projections(W, 4, 0, seed)["w"]["a"])
  base = draw(0)
  for seed in (2**32, 2**40, 2**64 - 1, np.uint64(2**33)):
    assert not np.array_equal(draw(seed), base), seed
  np.testing.assert_array_equal(draw(np.int64(5)), draw(5))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kappa=2**31), ValueError, "kappa"),
    (dict(kappa=0), ValueError, "kappa"),
    (dict(kappa=2.5), TypeError, "kappa"),
    (dict(decay="0.9"), TypeError, "decay"),
    (dict(decay=optax.constant_schedule(0.9)), TypeError, "decay"),
    (dict(decay=1.0), ValueError, "decay"),
    (dict(precision="bogus"), ValueError, "precision"),
    (dict(rank=-1), ValueError, "rank"),
    (dict(rank="x"), TypeError, "rank"),
    (dict(sketch="three_sided"), ValueError, "sketch"),
    (dict(bogus=1), TypeError, "bogus"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
  options = dict(rank=2)
  options.update(kwargs)
  with pytest.raises(error, match=match):
    flora_optax.flora_momentum(**options)


def test_numpy_integers_are_accepted_everywhere():
  tx = flora_optax.flora_momentum(np.int64(2), kappa=np.int64(5), seed=np.int32(1))
  tx.update(W, tx.init(W))
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), np.int64(2), np.int64(2))
  acc.update(W, acc.init(W))


def test_adafactor_rejects_a_bad_rank_even_without_momentum():
  for rank, error in ((-1, ValueError), ("x", TypeError)):
    with pytest.raises(error, match="rank"):
      flora_optax.flora_adafactor(1e-2, rank=rank, momentum=None)


def test_schedule_returning_a_float_or_zero():
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), lambda step: 2.7, 2)
  with pytest.raises(TypeError, match="integer"):
    acc.update(W, acc.init(W))
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), lambda step: step * 0, 2)
  with pytest.raises(Exception, match="returned 0"):
    jax.block_until_ready(jax.jit(acc.update)(W, acc.init(W)))


def test_matrix_axes_with_a_float_names_the_leaf():
  tx = flora_optax.flora_momentum(rank=2, axes=flora_optax.MatrixAxes(rows=0, cols=2.0))
  with pytest.raises(TypeError, match=r"params\['w'\]"):
    tx.init(W)


@pytest.mark.parametrize("cycle", [-1, 2.5, 2**32])
def test_projections_refuse_bad_cycles(cycle):
  with pytest.raises(ValueError, match="cycle"):
    flora_optax.projections(W, 4, cycle)


def test_counters_near_their_limits_keep_resampling():
  kappa = 3
  tx = flora_optax.flora_momentum(rank=2, kappa=kappa)
  state = tx.init(W)
  state = state._replace(count=jnp.asarray(2**31 - 2, jnp.int32),
                         cycle=jnp.asarray(2**32 - 1, jnp.uint32))
  step = jax.jit(tx.update)
  cycles = []
  for _ in range(3 * kappa):
    _, state = step(W, state)
    cycles.append(int(state.cycle))
  assert int(state.count) == 2**31 - 1                       # saturates, like optax's
  # One resample every kappa steps; the cycle number wraps from 2**32 - 1 to 0.
  assert cycles == [2**32 - 1] * kappa + [0] * kappa + [1] * kappa


def test_compressed_mean_keeps_the_gradient_dtype():
  w = jnp.ones((32, 16), jnp.bfloat16)
  b = jnp.ones((16,), jnp.bfloat16)
  x = jnp.ones((8, 32), jnp.bfloat16)
  grad_fn = jax.grad(lambda p, x: jnp.sum(x @ p["w"] + p["b"]).astype(jnp.float32))
  micro = optax.microbatching.microbatch(
      grad_fn, argnums=1, microbatch_size=2, accumulator=flora_optax.compressed_mean(4, 0))
  g = micro({"w": w, "b": b}, x)
  assert g["w"].dtype == jnp.bfloat16 and g["b"].dtype == jnp.bfloat16


def test_has_updated_finds_the_accumulation_state_anywhere():
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), 2, 2)
  chain = optax.chain(optax.identity(), acc)
  injected = optax.inject_hyperparams(flora_optax.flora_accumulate, static_args=(
      "opt", "every_k_schedule", "rank"))(optax.sgd(1.0), 2, 2)
  for tx in (chain, injected):
    state = tx.init(W)
    flags = []
    for _ in range(4):
      _, state = tx.update(W, state, W)
      flags.append(bool(flora_optax.has_updated(state)))
    assert flags == [False, True, False, True]
  with pytest.raises(ValueError, match="exactly one"):
    flora_optax.has_updated(optax.sgd(1.0).init(W))


def test_non_finite_gradients_are_skipped_without_touching_the_state():
  acc = flora_optax.flora_accumulate(optax.sgd(1.0), 2, 2,
                                     should_skip_update_fn=optax.skip_not_finite)
  state = acc.init(W)
  _, state = acc.update(W, state, W)
  bad = {"w": W["w"].at[0, 0].set(jnp.nan)}
  updates, skipped = acc.update(bad, state, W)
  assert np.all(np.asarray(updates["w"]) == 0)
  for a, b in zip(jax.tree.leaves(state.compressed_acc), jax.tree.leaves(skipped.compressed_acc)):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(np.asarray(buffer(skipped.compressed_acc["w"]))))


# ----------------------------------------------------------------------------- issue 21

RADEMACHER_GRADS = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)),
                                     jnp.float32)}


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def test_rademacher_singular_gram_keeps_the_momentum_finite():
  # With ±1 entries A Aᵀ is singular for 34 of 200 (8, 6) draws. 0.1.0's least-squares
  # transfer solved with it: the state was NaN from update 5 on, for good.
  tx = flora_optax.flora_momentum(rank=6, decay=0.9, kappa=1, projection="rademacher")
  state = tx.init({"w": jnp.zeros((64, 8))})
  step = jax.jit(tx.update)
  for t in range(200):
    out, state = step(RADEMACHER_GRADS, state)
    assert _finite(out) and _finite(state), t
  # The residual emit solves with the same Gram matrix (the unbiased transfer does not:
  # decay**kappa * sqrt(8/6) < 1 keeps it bounded, so only the residual is tested here).
  tx = flora_optax.flora_momentum(rank=6, decay=0.5, kappa=1, projection="rademacher",
                                  transfer="unbiased", emit="residual")
  state = tx.init({"w": jnp.zeros((64, 8))})
  step = jax.jit(tx.update)
  for t in range(60):
    out, state = step(RADEMACHER_GRADS, state)
    assert _finite(out) and _finite(state), t
  params = {"w": jnp.ones((64, 8))}
  for tx in (flora_optax.flora_adafactor(1e-2, rank=6, kappa=1, projection="rademacher"),
             flora_optax.flora_adamw(1e-2, rank=6, kappa=1, projection="rademacher")):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(60):
      out, state = step(RADEMACHER_GRADS, state, params)
      assert _finite(out) and _finite(state), t


@pytest.mark.parametrize("projection", ["gaussian", "orthogonal", "dct"])
def test_regularized_transfer_matches_a_float64_least_squares_fit(projection, rng):
  """On well-conditioned draws the ridge of `solve_gram` leaves the least-squares transfer
  where NumPy's (pinv) puts it, to the tolerance of test_momentum's transfer test."""
  params = {"tall": jnp.zeros((48, 16)), "wide": jnp.zeros((24, 40))}
  kappa, decay = 3, 0.5
  grads = [{k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
            for k, p in params.items()} for _ in range(kappa)]
  grads.append(jax.tree.map(jnp.zeros_like, params))
  tx = flora_optax.flora_momentum(4, decay, kappa, projection=projection)
  state = tx.init(params)
  for g in grads[:kappa]:
    _, state = tx.update(g, state)
  _, after = tx.update(grads[kappa], state)
  for name, side in (("tall", "cols"), ("wide", "rows")):
    a_old, a_new = (flora_optax.projections(params, 4, c, projection=projection)[name]
                    for c in (0, 1))
    old = reference.up(np.asarray(buffer(state.compressed_mu[name]), np.float64), a_old, side)
    expected = decay * reference.least_squares_fit(old, a_new, side)
    np.testing.assert_allclose(buffer(after.compressed_mu[name]), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_two_sided_degenerate_draws_stay_finite(rng):
  # A zero or rank-1 EMA leaves the range sketch rank-deficient (Q stays orthonormal); a
  # co-range draw Ψ with repeated rows made 0.1.0's triangular solve return ~1e8·‖X‖, a
  # zero one NaN.
  sketch = _sketches.TwoSided(6, "gaussian", jnp.float32, jax.lax.Precision.HIGHEST)
  leaf = jax.eval_shape(lambda: flora_optax.flora_momentum(6, sketch="two_sided").init(
      {"w": jnp.zeros((64, 16))})).compressed_mu["w"].leaf
  x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  draws = sketch.draw(jax.random.key(0), leaf)
  psi_row = draws["psi"][:1]
  for psi in (jnp.repeat(psi_row, draws["psi"].shape[0], 0), jnp.zeros_like(draws["psi"])):
    degenerate = {"omega": draws["omega"], "psi": psi}
    out = sketch.decompress(sketch.compress(x, degenerate, leaf), degenerate, leaf)
    assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) < 10 * float(jnp.abs(x).max())
  tx = flora_optax.flora_momentum(rank=6, decay=0.9, kappa=1, sketch="two_sided",
                                  emit="residual")
  step = jax.jit(tx.update)
  u, v = rng.standard_normal(64), rng.standard_normal(16)
  for g in (np.zeros((64, 16)), np.outer(u, v)):
    state = tx.init({"w": jnp.zeros((64, 16))})
    for _ in range(10):
      out, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    assert _finite(out) and _finite(state)


def _dct_rows_exact(freqs, d):
  """Rows of the orthonormal DCT-II in float64, the phase (2j+1)·k mod 4d in exact integers."""
  j = np.arange(d, dtype=object)
  rows = []
  for k in freqs:
    phase = np.asarray((2 * j + 1) * int(k) % (4 * d), np.float64)
    rows.append(np.sqrt((1 if k == 0 else 2) / d) * np.cos(np.pi * phase / (2 * d)))
  return np.stack(rows)


@pytest.mark.parametrize("d", [750_001, 1_000_003, 2**22 + 5])
def test_dct_rows_are_right_for_large_dimensions(d):
  # 0.1.0 formed (2j+1)·(k >> 8) in uint32, which overflows above d ≈ 7.41e5.
  freqs = [1, d // 3, d - 2, d - 1]
  got = _sketches._dct_rows(jnp.asarray(freqs, jnp.uint32), d, jnp.float32)
  # float32: the angle (below 2π) and the cosine are each good to about an ulp.
  np.testing.assert_allclose(np.asarray(got, np.float64) * np.sqrt(d / 2),
                             _dct_rows_exact(freqs, d) * np.sqrt(d / 2), rtol=0, atol=2e-6)


def test_dct_refuses_a_compressed_side_above_2_to_the_29():
  big = {"w": jax.ShapeDtypeStruct((4, 2**29 + 8), jnp.float32)}
  tx = flora_optax.flora_momentum(rank=2, projection="dct", side="cols")
  with pytest.raises(ValueError, match=r"params\['w'\] \(4, 536870920\).*d=536870920"):
    jax.eval_shape(tx.init, big)


def test_state_bytes_counts_typed_prng_keys():
  params = {"w": jnp.zeros((64, 32))}
  tx = optax.chain(optax.add_noise(0.1, 0.55, 0), flora_optax.flora_momentum(rank=4))
  state = tx.init(params)
  assert jax.dtypes.issubdtype(state[0].rng_key.dtype, jax.dtypes.prng_key)
  as_data = jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, state)
  expected = sum(np.asarray(x).nbytes for x in jax.tree.leaves(as_data))
  assert flora_optax.state_bytes(state) == expected               # 0.1.0: TypeError
  assert flora_optax.state_bytes(jax.eval_shape(tx.init, params)) == expected


def test_state_shardings_of_a_bare_array_keep_the_buffer_sharded():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  sharding = NamedSharding(mesh, P("data", None))
  tx = flora_optax.flora_momentum(rank=4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # 0.1.0: "matches no rule and is replicated"
    bare = flora_optax.state_shardings(tx, jnp.zeros((32, 16)), sharding)
  in_dict = flora_optax.state_shardings(tx, {"w": jnp.zeros((32, 16))}, {"w": sharding})
  assert in_dict.compressed_mu["w"].parts["c"].spec == P("data", None)
  assert bare.compressed_mu.parts["c"].spec == P("data", None)
  assert bare.key_data.spec == P()


def test_memory_report_counts_a_complex_naive_buffer():
  params = {"c": jnp.zeros((64, 32), jnp.complex64)}
  report = flora_optax.memory_report(params, rank=4)
  ema_bytes = flora_optax.state_bytes(optax.ema(0.9).init(params).ema)
  assert ema_bytes == 16384
  assert report.naive_bytes == ema_bytes                            # 0.1.0: 8192
  assert report.flora_bytes == ema_bytes   # not compressed: the same complex buffer


def test_a_changed_compressed_side_is_caught_by_the_params_saved_beside_the_state(tmp_path):
  # The projection's buffer of a (256, 96) leaf has the shape of a (256, 128) one's, and a
  # restore takes the static layout from its target: docs/howto/flax.md says so, and that
  # the parameters saved beside the state (its recipe) catch the change.
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = flora_optax.flora_momentum(rank=8)
  old = {"w": jnp.ones((256, 96))}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": old, "opt_state": tx.init(old)})
  new = {"w": jnp.ones((256, 128))}
  abstract = {"params": jax.eval_shape(lambda p: p, new),
              "opt_state": jax.eval_shape(tx.init, new)}
  assert (abstract["opt_state"].compressed_mu["w"].parts["c"].shape
          == tx.init(old).compressed_mu["w"].parts["c"].shape)
  with ocp.StandardCheckpointer() as checkpointer:
    with pytest.raises(ValueError, match=r"\(256, 128\).*\(256, 96\)"):
      checkpointer.restore(tmp_path / "ckpt", abstract)
