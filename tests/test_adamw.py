"""flora_adamw: AdamW with a compressed first moment, against optax.adamw and NumPy."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from tests.conftest import trajectory

PARAMS = {"w": jnp.zeros((32, 48)), "emb": jnp.zeros((200, 16)), "b": jnp.zeros(48)}


def tree(rng, scale=1.0):
  return {k: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32)
          for k, p in PARAMS.items()}


@pytest.mark.parametrize("weight_decay_mask", [None, {"w": True, "emb": False, "b": False}])
def test_without_compression_it_is_optax_adamw(weight_decay_mask, rng):
  params, grads = tree(rng), [tree(rng) for _ in range(6)]
  ours, _ = trajectory(flora_optax.flora_adamw(1e-2, 4, weight_decay=0.1, mask=False,
                                               weight_decay_mask=weight_decay_mask),
                       params, grads)
  theirs, _ = trajectory(optax.adamw(1e-2, weight_decay=0.1, mask=weight_decay_mask),
                         params, grads)
  for o, t in zip(ours, theirs):
    for k in PARAMS:
      np.testing.assert_allclose(o[k], t[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("first_moment", ["preconditioned", "raw"])
@pytest.mark.parametrize("second_moment", ["full", "factored"])
@pytest.mark.parametrize("options", [{}, dict(projection="gaussian", emit="compressed")],
                         ids=["defaults", "paper"])
def test_matches_a_float64_reference(first_moment, second_moment, options, rng):
  """Adam's arithmetic around the compressed EMA, re-derived in NumPy from the projections
  (one compressed leaf, `w`, 32x48 at rank 8: its 32 rows are compressed), with the defaults
  (DCT rows, the residual emitted) and the paper's form (Gaussian, compressed)."""
  b1, b2, eps, lr, kappa = 0.9, 0.99, 1e-8, 1e-2, 100
  params = {"w": jnp.zeros((32, 48))}
  grads = [{"w": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)} for _ in range(5)]
  tx = flora_optax.flora_adamw(lr, 8, b1, b2, eps, weight_decay=0.0, kappa=kappa, seed=4,
                               first_moment=first_moment, second_moment=second_moment,
                               **options)
  ours, _ = trajectory(tx, params, grads)
  sketch = {k: v for k, v in options.items() if k != "emit"}
  a = np.asarray(flora_optax.projections(params, 8, 0, 4, **sketch)["w"]["a"],
                 np.float64)  # (8, 32)
  outside = np.eye(32) - a.T @ np.linalg.solve(a @ a.T, a)   # I - P, P onto A's rows
  m = np.zeros((8, 48))
  v = np.zeros((32, 48)) if second_moment == "full" else (np.zeros(32), np.zeros(48))
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g["w"], np.float64)
    if second_moment == "full":
      v = b2 * v + (1 - b2) * g**2
      v_full = v
    else:
      v = (b2 * v[0] + (1 - b2) * np.mean(g**2, 1), b2 * v[1] + (1 - b2) * np.mean(g**2, 0))
      v_full = np.outer(v[0], v[1]) / np.mean(v[0])
    denom = np.sqrt(v_full / (1 - b2**t)) + eps
    source = g / denom if first_moment == "preconditioned" else g
    m = b1 * m + (1 - b1) * (a @ source)
    update = a.T @ m
    if options.get("emit", "residual") == "residual":
      update = update + outside @ source     # residual_weight 1
    update = update / (1 - b1**t)
    if first_moment == "raw":
      update = update / denom
    # float32 against float64: entries that cancel to near zero (or sit above a tiny nu)
    # carry an absolute error of a few ulps of the largest entry, as in the other references.
    np.testing.assert_allclose(ours[t - 1]["w"], -lr * update, rtol=2e-4,
                               atol=2e-4 * lr * np.abs(update).max(), err_msg=f"step {t}")


def test_state_sizes():
  """GPT-2-small-like shapes with the embedding compressed along its hidden side."""
  params = {"wte": jax.ShapeDtypeStruct((50257, 768), jnp.float32),
            "qkv": jax.ShapeDtypeStruct((768, 2304), jnp.float32),
            "fc": jax.ShapeDtypeStruct((768, 3072), jnp.float32),
            "ln": jax.ShapeDtypeStruct((768,), jnp.float32)}
  rank = 768 // 4
  adamw = flora_optax.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  full = flora_optax.state_bytes(jax.eval_shape(flora_optax.flora_adamw(1e-3, rank).init, params))
  factored = flora_optax.state_bytes(jax.eval_shape(
      flora_optax.flora_adamw(1e-3, rank, second_moment="factored").init, params))
  assert abs(full / adamw - (1 + 1 / 4) / 2) < 0.01      # nu full, mu at rank d/4
  assert factored / adamw < 0.3                          # the target
  assert factored / adamw == pytest.approx(1 / 8, abs=0.01)  # (rank/d)/2 plus vectors


def test_trains_and_works_in_nnx_and_inject_hyperparams(rng):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(16, 64, rngs=rngs)
      self.l2 = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  x = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
  y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((16, 4)), jnp.float32) / 4)
  factory = optax.inject_hyperparams(flora_optax.flora_adamw,
                                     static_args=("rank", "kappa", "seed"))
  for tx in (flora_optax.flora_adamw(1e-2, 8, kappa=20),
             factory(learning_rate=1e-2, rank=8, kappa=20),
             flora_optax.flora_adamw(1e-2, 8, kappa=20, sketch="two_sided",
                                     second_moment="factored")):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(150)]
    assert losses[-1] < 0.2 * losses[0], losses[::30]


def test_bad_options():
  with pytest.raises(ValueError, match="second_moment"):
    flora_optax.flora_adamw(1e-3, 4, second_moment="sketched")
  with pytest.raises(ValueError, match="first_moment"):
    flora_optax.flora_adamw(1e-3, 4, first_moment="later")
  with pytest.raises(ValueError, match="b2"):
    flora_optax.flora_adamw(1e-3, 4, b2=1.5)
  with pytest.raises(ValueError, match="b1=1.0"):
    flora_optax.flora_adamw(1e-3, 4, b1=1.0)
