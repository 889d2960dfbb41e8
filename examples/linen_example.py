"""Flora with Flax linen: compressed gradient accumulation and momentum in a TrainState.

A linen MLP is trained on a synthetic classification task with
``flora_optax.flora_accumulate(flora_optax.flora_adafactor(...), every_k_schedule=4, rank=64)``:
gradients of 4 micro-batches are averaged in a compressed buffer, then Adafactor with
compressed momentum takes one step. The same run with the naive
``optax.MultiSteps(optax.adafactor(momentum=0.9), 4)`` is printed beside it. Runs in a few
seconds on a CPU::

    python examples/linen_example.py

Expect the Flora run to learn more slowly in this tiny setting (final micro-batch loss about
1.49 against 1.06 for the naive run, with less than half the optimizer state): both the
accumulator and the momentum of the 256x256 layer are random rank-64 sketches, whose noise
grows with 256/64. Raise ``RANK`` to trade memory for accuracy. (The (64, 256) first layer
is not compressed at rank 64: its smaller side is not larger than the rank.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import flora_optax

WIDTH, CLASSES, RANK, MICRO_STEPS = 256, 10, 64, 4
UPDATES, MICRO_BATCH = 60, 32


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(WIDTH)(x))
    x = nn.gelu(nn.Dense(WIDTH)(x))
    return nn.Dense(CLASSES)(x)


def make_data(rng):
  """Labels from a random linear teacher on 64-d Gaussian inputs."""
  teacher = rng.standard_normal((64, CLASSES))
  x = rng.standard_normal((UPDATES * MICRO_STEPS, MICRO_BATCH, 64)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.argmax(x @ teacher, axis=-1))


def train(tx, name, x, y):
  model = MLP()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), x[0]), tx=tx)

  @jax.jit
  def micro_step(state, xb, yb):
    def loss_fn(params):
      logits = state.apply_fn(params, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # Inner micro-steps return zero updates; the last one of each cycle applies the step.
    return state.apply_gradients(grads=grads), loss

  for i in range(len(x)):
    state, loss = micro_step(state, x[i], y[i])
    if i % (20 * MICRO_STEPS) == MICRO_STEPS - 1 or i == len(x) - 1:
      print(f"  {name:>6s} update {i // MICRO_STEPS:3d}  loss {float(loss):.4f}")
  return float(loss), flora_optax.state_bytes(state.opt_state)


def main():
  x, y = make_data(np.random.default_rng(0))
  flora = flora_optax.flora_accumulate(
      flora_optax.flora_adafactor(1e-2, rank=RANK, momentum=0.9, kappa=20),
      every_k_schedule=MICRO_STEPS, rank=RANK)
  naive = optax.MultiSteps(optax.adafactor(1e-2, momentum=0.9), MICRO_STEPS)
  flora_loss, flora_bytes = train(flora, "flora", x, y)
  naive_loss, naive_bytes = train(naive, "naive", x, y)
  print(f"\nfinal micro-batch loss: flora {flora_loss:.4f}, naive {naive_loss:.4f}")
  print(f"optimizer state (momentum + accumulator + Adafactor): flora "
        f"{flora_bytes / 1024:.0f} KiB, naive {naive_bytes / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
