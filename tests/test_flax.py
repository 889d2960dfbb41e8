"""Flora optimizers driven by Flax: ``nnx.Optimizer`` and linen's ``TrainState``.

Two models per API: one with 2-D kernels only, and one with a ``LinearGeneral``/
``DenseGeneral`` kernel ``(16, 4, 8)`` and a scanned stack of three layers (kernel
``(3, 32, 32)``), viewed as matrices with :class:`flora_optax.MatrixAxes`. Each is trained a
few steps (the loss must fall), its optimizer state must hold the compressed shapes, and with
every leaf masked out the optimizers must reproduce ``optax.adafactor(momentum=...)`` and
``optax.ema``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import flora_optax

RANK = 4
STEPS = 30
LR = 3e-2


def _name(path):
  return jax.tree_util.keystr(tuple(path))


def kernels_only(params):
  """Compress kernels only (a LinearGeneral bias is 2-D too)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in _name(path), params)


def kernel_axes(params):
  """Matrix views of the 3-D kernels; paths match both NNX states and linen dicts."""
  def rule(path, _):
    name = _name(path)
    if "blocks" in name and "kernel" in name:   # scanned stack (layers, in, out)
      return flora_optax.MatrixAxes(rows=1, cols=2, batch=0)
    if "head" in name and "kernel" in name:     # (in, heads, head_dim)
      return flora_optax.MatrixAxes(rows=0, cols=(1, 2))
    return None
  return jax.tree_util.tree_map_with_path(rule, params)


# Compressed state shapes at rank 4 ("smaller" side): leaf path fragment -> shape.
EXPECTED_SHAPES = {
    "dense": {"['dense1']['kernel']": (RANK, 32),     # (16, 32): the 16 rows compressed
              "['dense2']['kernel']": (32, RANK),     # (32, 8): the 8 columns
              "['dense1']['bias']": (32,)},
    "stacked": {"['head']['kernel']": (RANK, 32),     # (16, 4*8)
                "['blocks']": (3, 32, RANK),          # kernel (3, 32, 32), one per layer
                "['out']['kernel']": (32, RANK),
                "['head']['bias']": (4, 8)},          # masked out: full size
}


def flora_tx(**overrides):
  options = dict(learning_rate=LR, rank=RANK, momentum=0.9, kappa=5, mask=kernels_only,
                 axes=kernel_axes)
  options.update(overrides)
  return flora_optax.flora_adafactor(**options)


def data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 16)).astype(np.float32)
  teacher = rng.standard_normal((16, 8)).astype(np.float32) / 4
  return jnp.asarray(x), jnp.asarray(np.tanh(x @ teacher))


def find_momentum(opt_state):
  is_momentum = lambda x: isinstance(x, flora_optax.FloraMomentumState)  # noqa: E731
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_momentum) if is_momentum(s))


def check_shapes(compressed_mu, kind):
  shapes = {_name(path): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(compressed_mu)[0]}
  for fragment, shape in EXPECTED_SHAPES[kind].items():
    matches = [s for name, s in shapes.items()
               if fragment in name and ("kernel" in name or "bias" in fragment)
               and "range" not in name]
    assert matches and all(s == shape for s in matches), (fragment, shapes)


# ------------------------------------------------------------------ NNX


class DenseNNX(nnx.Module):

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(16, 32, rngs=rngs)
    self.dense2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.dense2(jnp.tanh(self.dense1(x)))


class StackedNNX(nnx.Module):

  def __init__(self, rngs):
    self.head = nnx.LinearGeneral(16, (4, 8), rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs):
      return nnx.Linear(32, 32, rngs=rngs)

    self.blocks = create_blocks(rngs)
    self.out = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    h = self.head(x).reshape(x.shape[0], 32)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, h):
      return h + jnp.tanh(block(h))

    return self.out(body(self.blocks, h))


NNX_MODELS = {"dense": DenseNNX, "stacked": StackedNNX}


def train_nnx(kind, tx, steps):
  model = NNX_MODELS[kind](nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  x, y = data()
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
  return model, optimizer, losses


@pytest.mark.parametrize("kind", ["dense", "stacked"])
def test_nnx_optimizer_trains_with_compressed_state(kind):
  model, optimizer, losses = train_nnx(kind, flora_tx(), STEPS)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  momentum = find_momentum(nnx.as_pure(optimizer.opt_state))
  assert int(momentum.count) == STEPS
  check_shapes(momentum.compressed_mu, kind)
  # The optimizer's arrays have the structure state_shardings describes (pure params).
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  shardings = flora_optax.state_shardings(
      optimizer.tx, params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert (jax.tree.structure(shardings)
          == jax.tree.structure(nnx.as_pure(optimizer.opt_state)))


# ------------------------------------------------------------------ linen


class DenseLinen(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="dense2")(jnp.tanh(nn.Dense(32, name="dense1")(x)))


class Block(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    return h + jnp.tanh(nn.Dense(32)(h)), None


class StackedLinen(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((4, 8), name="head")(x).reshape(x.shape[0], 32)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    h, _ = blocks(name="blocks")(h, None)
    return nn.Dense(8, name="out")(h)


LINEN_MODELS = {"dense": DenseLinen, "stacked": StackedLinen}


def train_linen(kind, tx, steps):
  model = LINEN_MODELS[kind]()
  x, y = data()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), x), tx=tx)

  @jax.jit
  def train_step(state, x, y):
    loss_fn = lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(steps):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
  return state, losses


@pytest.mark.parametrize("kind", ["dense", "stacked"])
def test_linen_train_state_trains_with_compressed_state(kind):
  state, losses = train_linen(kind, flora_tx(), STEPS)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  assert state.params["params"]["dense1" if kind == "dense" else "head"]["kernel"].shape[0] == 16
  momentum = find_momentum(state.opt_state)
  assert int(momentum.count) == STEPS
  check_shapes(momentum.compressed_mu, kind)
  if kind == "stacked":
    assert state.params["params"]["blocks"]["Dense_0"]["kernel"].shape == (3, 32, 32)


# ------------------------------------------------------------------ masked out = optax


def masked_pair(reference):
  """(Flora with every leaf masked out, the optax optimizer it must then equal, model)."""
  if reference == "adafactor":
    return (flora_tx(mask=False, momentum_position="after_param_scale"),
            optax.adafactor(LR, momentum=0.9), "stacked")
  return (optax.chain(flora_optax.flora_momentum(RANK, 0.9, kappa=2, mask=False),
                      optax.scale(-LR)),
          optax.chain(optax.ema(0.9, debias=False), optax.scale(-LR)), "dense")


@pytest.mark.parametrize("reference", ["adafactor", "ema"])
def test_nnx_masked_out_equals_optax(reference):
  flora, plain, kind = masked_pair(reference)
  model_f, _, losses_f = train_nnx(kind, flora, 4)
  model_p, _, losses_p = train_nnx(kind, plain, 4)
  np.testing.assert_allclose(losses_f, losses_p, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               nnx.as_pure(nnx.state(model_f, nnx.Param)),
               nnx.as_pure(nnx.state(model_p, nnx.Param)))


@pytest.mark.parametrize("reference", ["adafactor", "ema"])
def test_linen_masked_out_equals_optax(reference):
  flora, plain, kind = masked_pair(reference)
  state_f, losses_f = train_linen(kind, flora, 4)
  state_p, losses_p = train_linen(kind, plain, 4)
  np.testing.assert_allclose(losses_f, losses_p, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state_f.params, state_p.params)
  # Nothing was compressed: the momentum buffers have the parameters' shapes.
  assert (jax.tree.map(np.shape, find_momentum(state_f.opt_state).compressed_mu)
          == jax.tree.map(np.shape, state_f.params))


@pytest.mark.parametrize("make", [
    lambda: flora_optax.flora_momentum(RANK, 0.9, 3),
    lambda: flora_optax.flora_adafactor(LR, RANK, kappa=3),
    lambda: flora_optax.flora_adamw(LR, RANK, kappa=3),
    lambda: flora_optax.flora_accumulate(optax.adamw(LR), 2, RANK),
], ids=["momentum", "adafactor", "adamw", "accumulate"])
def test_boxed_nnx_states_as_params_and_updates(make):
  """Boxed trees (nnx.State of nnx.Param, as `nnx.state(model, nnx.Param)` gives) passed to
  both init and update, as a hand-written NNX loop does: updates keep the boxed structure."""
  model = DenseNNX(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = make()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(4):
    updates, state = step(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(updates))


def test_nnx_optimizer_with_the_folded_preconditioner_equals_the_plain_chain():
  """nnx.Optimizer on boxed parameters whose kernels are factored (min_dim_size_to_factor=8):
  flora_adafactor's folded preconditioner against the chain that forms the scaled update."""
  plain = optax.chain(optax.scale_by_factored_rms(True, 0.8, 0, 8, 1e-30),
                      flora_optax.flora_momentum(RANK, 0.9, 5, 0, mask=kernels_only),
                      optax.clip_by_block_rms(1.0),
                      optax.scale_by_learning_rate(LR, flip_sign=False),
                      optax.scale_by_param_block_rms(), optax.scale(-1))
  folded = flora_optax.flora_adafactor(LR, RANK, kappa=5, mask=kernels_only,
                                       min_dim_size_to_factor=8)
  (m1, _, l1), (m2, _, l2) = (train_nnx("dense", tx, 12) for tx in (folded, plain))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(m1, nnx.Param)),
                  jax.tree.leaves(nnx.state(m2, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert l1[-1] < l1[0]
