"""Online low-rank factors (``sketch="factors"``) against a float64 NumPy reference.

The reference is the recurrence of ``OnlineFactors.fold`` written plainly: one Newton step on
``B`` from the old ``A``, one on ``A`` from the new ``B``, both through the same ridge, then
the rows of ``A`` rescaled to unit norm. The product ``B A`` does not depend on the rescaling
(the recurrence is equivariant under ``B D⁻¹, D A``), so the reference's product is also
compared with one that never rescales.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

STACK = flora_optax.MatrixAxes(rows=1, cols=2, batch=0)
PARAMS = {"tall": jnp.zeros((48, 24)), "wide": jnp.zeros((20, 40)),
          "stack": jnp.zeros((3, 30, 16)), "bias": jnp.zeros(16)}
AXES = {"tall": None, "wide": None, "stack": STACK, "bias": None}
RANK = 8


def fold(b, a, g, rate, balance=True):
  """One fold of the float64 reference (batched over leading axes): the least-squares Newton
  steps ``B ← (1-γ)B + γ G A⁺``, ``A ← (1-γ)A + γ B⁺ G`` (``⁺``: the pseudo-inverse, which
  is the inverse Gram times the transpose for a full-rank factor)."""
  keep = np.sqrt(1 - rate)
  b = keep * b + (1 - keep) * g @ np.linalg.pinv(a)
  a = keep * a + (1 - keep) * np.linalg.pinv(b) @ g
  if balance:
    norms = np.linalg.norm(a, axis=-1)
    a, b = a / norms[..., None], b * norms[..., None, :]
  return b, a


def initial(state_mu):
  return {k: (np.asarray(v.parts["b"], np.float64), np.asarray(v.parts["a"], np.float64))
          for k, v in state_mu.items() if isinstance(v, flora_optax.Compressed)}


def grads(rng, steps):
  return [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                       PARAMS) for _ in range(steps)]


def test_memory_matches_a_projection_of_the_same_rank():
  state = flora_optax.flora_momentum(RANK, sketch="factors", axes=AXES).init(PARAMS)
  mu = state.compressed_mu
  for name, p in PARAMS.items():
    if p.ndim == 1:
      assert mu[name].shape == p.shape
      continue
    n, m = p.shape[-2:]
    k = RANK * max(n, m) // (n + m)
    assert mu[name].parts["b"].shape == p.shape[:-2] + (n, k)
    assert mu[name].parts["a"].shape == p.shape[:-2] + (k, m)
    assert k * (n + m) <= RANK * max(n, m)
    # A starts with orthonormal rows, B at zero: the momentum starts at zero.
    a = np.asarray(mu[name].parts["a"], np.float64)
    np.testing.assert_allclose(a @ np.swapaxes(a, -1, -2), np.broadcast_to(np.eye(k), a.shape[:-2] + (k, k)), atol=1e-5)
    assert not np.any(np.asarray(mu[name].parts["b"]))


@pytest.mark.parametrize("emit", ["compressed", "residual", "exact_gradient"])
def test_momentum_matches_the_float64_recurrence(emit, rng):
  decay = 0.8
  tx = flora_optax.flora_momentum(RANK, decay, kappa=3, seed=4, sketch="factors", axes=AXES,
                                  emit=emit)
  state = tx.init(PARAMS)
  ref = initial(state.compressed_mu)
  plain = {k: (b.copy(), a.copy()) for k, (b, a) in ref.items()}
  bias = np.zeros(16)
  update = jax.jit(tx.update)
  for g in grads(rng, 12):
    out, state = update(g, state)
    for name, (b, a) in ref.items():
      x = np.asarray(g[name], np.float64)
      old = b @ a
      ref[name] = fold(b, a, x, 1 - decay)
      plain[name] = fold(*plain[name], x, 1 - decay, balance=False)
      b, a = ref[name]
      want = b @ a
      np.testing.assert_allclose(plain[name][0] @ plain[name][1], want, rtol=1e-9, atol=1e-9)
      if emit == "residual":
        want = want + (x - x @ np.linalg.pinv(a) @ a)   # residual_weight 1, the default
      elif emit == "exact_gradient":
        want = decay * old + (1 - decay) * x
      scale = np.abs(want).max()
      np.testing.assert_allclose(np.asarray(out[name]), want, rtol=0, atol=2e-4 * scale)
      np.testing.assert_allclose(np.asarray(state.compressed_mu[name].parts["a"]), a,
                                 rtol=0, atol=2e-4)
    bias = decay * bias + (1 - decay) * np.asarray(g["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(out["bias"]), bias, rtol=1e-6, atol=1e-6)


def test_accumulation_is_exact_on_a_low_rank_stream(rng):
  """A running mean of matrices with fixed column and row spaces of rank ≤ k is recovered
  exactly (the first fold, at rate 1, is a range finder: B A = P_B G), in every cycle."""
  tx = flora_optax.flora_accumulate(optax.sgd(1.0), 4, RANK, sketch="factors", axes=AXES)
  state = tx.init(PARAMS)
  ks = {k: v.parts["a"].shape[-2] for k, v in state.compressed_acc.items()
        if isinstance(v, flora_optax.Compressed)}
  spaces = {k: (rng.standard_normal(PARAMS[k].shape[:-1] + (ks[k],)),
                rng.standard_normal(PARAMS[k].shape[:-2] + (ks[k], PARAMS[k].shape[-1])))
            for k in ks}
  update = jax.jit(tx.update)
  for cycle in range(3):
    stream = []
    for _ in range(4):
      g = {k: (jnp.asarray(np.einsum("...nk,...k,...km->...nm", u,
                                     1 + rng.uniform(size=u.shape[:-2] + (u.shape[-1],)), v),
                           jnp.float32) if k in spaces else
               jnp.asarray(rng.standard_normal(PARAMS[k].shape), jnp.float32))
           for k, (u, v) in {**spaces, "bias": (None, None)}.items()}
      stream.append(g)
      out, state = update(g, state, PARAMS)
    for name in PARAMS:
      mean = np.mean([np.asarray(g[name], np.float64) for g in stream], axis=0)
      np.testing.assert_allclose(-np.asarray(out[name]), mean, rtol=0,
                                 atol=1e-4 * np.abs(mean).max(), err_msg=f"{name} {cycle}")


def test_momentum_converges_to_the_ema_of_a_low_rank_stream(rng):
  """With fixed column and row spaces of rank k and a well-conditioned EMA, B A → the EMA
  (the start ``A₀`` decays as ``sqrt(decay)**t``)."""
  p = {"w": jnp.zeros((40, 24))}
  tx = flora_optax.flora_momentum(8, 0.9, sketch="factors")
  state = tx.init(p)
  k = state.compressed_mu["w"].parts["a"].shape[0]
  u, v = rng.standard_normal((40, k)), rng.standard_normal((k, 24))
  ema = np.zeros((40, 24))
  update = jax.jit(tx.update)
  errors = []
  for _ in range(400):
    g = u @ np.diag(1 + rng.uniform(size=k)) @ v
    ema = 0.9 * ema + 0.1 * g
    out, state = update({"w": jnp.asarray(g, jnp.float32)}, state)
    errors.append(np.abs(np.asarray(out["w"]) - ema).max() / np.abs(ema).max())
  assert errors[10] > 1e-2            # not exact from the start: A₀ is random
  assert max(errors[-50:]) < 2e-4, errors[-50:]


def test_zero_and_rank_deficient_updates_never_give_nan(rng):
  p = {"w": jnp.zeros((40, 24))}
  for make in (lambda: flora_optax.flora_momentum(8, 0.9, sketch="factors", emit="residual"),
               lambda: flora_optax.flora_accumulate(optax.sgd(1.0), 2, 8, sketch="factors")):
    tx = make()
    state = tx.init(p)
    update = jax.jit(tx.update)
    # Zero updates (a frozen leaf), a rank-1 update, then ordinary ones.
    stream = ([np.zeros((40, 24))] * 300 + [np.outer(rng.standard_normal(40),
                                                     rng.standard_normal(24))] * 3
              + [rng.standard_normal((40, 24)) for _ in range(5)])  # 308: a cycle ends
    for g in stream:
      out, state = update({"w": jnp.asarray(g, jnp.float32)}, state, p)
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((out, state)))
    assert np.abs(np.asarray(out["w"])).max() > 0  # it recovered from the zero stream


def test_bfloat16_storage_tracks_float32(rng):
  outs = {}
  for dtype in ("float32", "bfloat16"):
    tx = flora_optax.flora_momentum(RANK, 0.9, sketch="factors", axes=AXES, dtype=dtype)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for g in grads(np.random.default_rng(0), 30):
      out, state = update(g, state)
    assert state.compressed_mu["tall"].parts["b"].dtype == jnp.dtype(dtype)
    outs[dtype] = np.asarray(out["tall"])
  err = np.linalg.norm(outs["bfloat16"] - outs["float32"]) / np.linalg.norm(outs["float32"])
  assert err < 0.05, err


def test_aliases_inject_hyperparams_and_reports_take_factors(rng):
  g = grads(rng, 1)[0]
  for tx in (flora_optax.flora_adafactor(1e-2, RANK, sketch="factors", axes=AXES,
                                         min_dim_size_to_factor=8),
             flora_optax.flora_adamw(1e-2, RANK, sketch="factors", axes=AXES),
             flora_optax.flora_accumulate(flora_optax.flora_adafactor(
                 1e-2, RANK, sketch="factors", axes=AXES), 2, RANK, sketch="factors", axes=AXES),
             optax.inject_hyperparams(flora_optax.flora_adamw, static_args=("rank",))(
                 learning_rate=1e-2, rank=RANK, sketch="factors", axes=AXES)):
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    for _ in range(3):
      out, state = step(g, state, PARAMS)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
  report = flora_optax.memory_report(PARAMS, RANK, sketch="factors", axes=AXES)
  state = flora_optax.flora_momentum(RANK, sketch="factors", axes=AXES).init(PARAMS)
  assert flora_optax.state_bytes(state.compressed_mu) == sum(
      x.size * 4 for x in jax.tree.leaves(state.compressed_mu))
  assert "tall" in str(report)


def test_options_that_do_not_apply_are_refused():
  with pytest.raises(ValueError, match="sketch='projection' only"):
    flora_optax.flora_momentum(RANK, sketch="factors", projection="dct")
  with pytest.raises(ValueError, match="linear sketch"):
    flora_optax.compressed_mean(RANK, 0, sketch="factors")
  with pytest.raises(ValueError, match="transfer"):
    flora_optax.flora_momentum(RANK, sketch="factors", transfer="unbiased")
