"""Shared fixtures: a mixed parameter tree and its NumPy views."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from tests import reference


# A tree with every kind of leaf: wide and tall matrices, a vector, a scanned stack viewed as a
# batch of matrices, and a conv kernel viewed with the default (all-but-last axes are rows).
SHAPES = {
    "wide": (24, 40),
    "tall": (48, 16),
    "bias": (16,),
    "stack": (3, 12, 20),
    "conv": (3, 3, 4, 10),
}
AXES = {
    "wide": None,
    "tall": None,
    "bias": None,
    "stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0),
    "conv": None,
}
VIEWS = {
    "wide": reference.View((24, 40)),
    "tall": reference.View((48, 16)),
    "stack": reference.View((3, 12, 20), batch=(0,), rows=(1,), cols=(2,)),
    "conv": reference.View((3, 3, 4, 10), rows=(0, 1, 2), cols=(3,)),
}
RANK = 4


def side_of(view, side):
  if side in ("rows", "cols"):
    return side
  smaller = "rows" if view.n < view.m else "cols"
  if side == "smaller":
    return smaller
  return "cols" if smaller == "rows" else "rows"


def buffer(x):
  """The array of a buffer: a projection-compressed leaf's ``parts["c"]``, else the array."""
  return x.parts["c"] if isinstance(x, flora_optax.Compressed) else x


def run_transform(tx, grads, params, *, apply_updates=False):
  """Jitted ``tx.update`` over `grads` from ``tx.init(params)``: (outputs, final state).

  With `apply_updates` the params move with each update (an optimizer's trajectory)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    out, state = update(g, state, params)
    if apply_updates:
      params = optax.apply_updates(params, out)
    outs.append(out)
  return outs, state


def trajectory(tx, params, grads):
  """An optimizer's updates along its own trajectory: (the updates, the final state)."""
  return run_transform(tx, grads, params, apply_updates=True)


def random_tree(rng, shapes=SHAPES, dtype=np.float32, scale=1.0):
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


@pytest.fixture
def rng(request):
  # A fresh stream per test, the same on every run: str hashes are salted per process, a CRC
  # of the test's id is not.
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def params():
  return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}

# The scripts in multidevice/ are run as subprocesses; importing them (as --doctest-modules
# would) sets XLA_FLAGS for 8 devices in this process and every subprocess it starts.
collect_ignore_glob = ["multidevice/*"]
