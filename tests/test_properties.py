"""Property-based checks (hypothesis) of the matrix views, projections and memory accounting."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings

import flora_optax
from flora_optax import _buffers, _options, _sketches
from tests import reference

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def leaf_and_axes(draw):
  ndim = draw(st.integers(2, 4))
  shape = tuple(draw(st.lists(st.integers(2, 9), min_size=ndim, max_size=ndim)))
  order = draw(st.permutations(range(ndim)))
  n_batch = draw(st.integers(0, ndim - 2))
  n_rows = draw(st.integers(1, ndim - n_batch - 1))
  batch = tuple(order[:n_batch])
  rows = tuple(order[n_batch:n_batch + n_rows])
  cols = tuple(order[n_batch + n_rows:])
  side = draw(st.sampled_from(["smaller", "larger", "rows", "cols"]))
  projection = draw(st.sampled_from(["gaussian", "orthogonal", "rademacher"]))
  return shape, batch, rows, cols, side, projection


@SETTINGS
@given(leaf_and_axes(), st.integers(1, 6), st.integers(0, 2**16))
def test_down_and_up_match_numpy_on_any_view(spec, rank, seed):
  shape, batch, rows, cols, side, projection = spec
  view = reference.View(shape, batch, rows, cols)
  chosen = {"smaller": "rows" if view.n < view.m else "cols",
            "larger": "cols" if view.n < view.m else "rows"}.get(side, side)
  d = view.m if chosen == "cols" else view.n
  axes = flora_optax.MatrixAxes(rows=rows, cols=cols, batch=batch)
  options = _options.Compression(rank=rank, axes=axes, side=side, projection=projection)
  leaf = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  node = _buffers.init(leaf, options)
  if rank >= d:
    assert not _buffers.is_compressed(node) and node.shape == shape
    return
  assert _buffers.is_compressed(node) and node.leaf.side == chosen
  expected_state = view.batch_shape + ((view.n, rank) if chosen == "cols" else (rank, view.m))
  assert node.parts["c"].shape == expected_state
  assert math.prod(expected_state) < math.prod(shape)
  draws = node.sketch.draw(jax.random.key(seed), node.leaf)
  a = draws["a"]
  assert a.shape == view.batch_shape + (rank, d)
  c = node.sketch.compress(leaf, draws, node.leaf)["c"]
  ref_c = reference.down(view.to(leaf), a, chosen)
  np.testing.assert_allclose(c, ref_c, rtol=1e-4, atol=1e-4)
  back = node.sketch.decompress({"c": c}, draws, node.leaf)
  assert back.shape == shape
  np.testing.assert_allclose(back, view.back(reference.up(ref_c, a, chosen)), rtol=1e-4,
                             atol=1e-4)


# Each example compiles a vmap of its own shape (the slowest property here): 12 examples.
@settings(SETTINGS, max_examples=12)
@given(st.integers(2, 40), st.integers(1, 39), st.sampled_from(["gaussian", "rademacher",
                                                                  "orthogonal", "dct"]))
def test_projection_is_isotropic_in_expectation(d, rank, kind):
  """Mean of AᵀA over many draws is I (each entry within a few standard errors)."""
  rank = min(rank, d)
  keys = jax.random.split(jax.random.key(d * 100 + rank), 400)
  mats = jax.vmap(lambda k: _sketches.make_projection(k, (rank, d), kind, jnp.float32))(keys)
  gram = np.asarray(jnp.einsum("brd,bre->bde", mats, mats), np.float64)
  mean = gram.mean(axis=0)
  stderr = gram.std(axis=0) / np.sqrt(len(keys)) + 1e-6
  assert np.all(np.abs(mean - np.eye(d)) < 6 * stderr + 1e-5)
  if kind in ("orthogonal", "dct"):
    # A Aᵀ = (d/r) I exactly: orthonormal rows scaled by sqrt(d/r).
    np.testing.assert_allclose(np.asarray(mats[0] @ mats[0].T), d / rank * np.eye(rank),
                               atol=1e-4 * d)


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=6),
       st.integers(1, 64))
def test_state_bytes_account_for_every_leaf(shapes, rank):
  params = {f"p{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
  tx = flora_optax.flora_momentum(rank, 0.9, 10)
  state = jax.eval_shape(tx.init, params)
  report = flora_optax.memory_report(params, rank)
  expected = sum(r * max(s) if r < min(s) else s[0] * s[1] for s in shapes for r in [rank]) * 4
  assert report.flora_bytes == expected == flora_optax.state_bytes(state.compressed_mu)
  assert flora_optax.state_bytes(state) <= expected + 16 * len(shapes) + 64


def test_transform_draws_are_bit_identical_to_projections():
  """The draws a transform makes inside jit are, bit for bit, what `projections` regenerates
  for each leaf alone (same-shape leaves included)."""
  params = {"a": jnp.zeros((24, 40)), "b": jnp.zeros((24, 40)), "c": jnp.zeros((40, 24)),
            "d": jnp.zeros((3, 12, 20)), "v": jnp.zeros(5)}
  axes = {"a": None, "b": None, "c": None, "v": None,
          "d": flora_optax.MatrixAxes(rows=1, cols=2, batch=0)}
  cases = [dict(projection=k) for k in ("gaussian", "orthogonal", "rademacher", "dct")]
  for options in cases + [dict(sketch="two_sided")]:
    compression = _options.Compression(rank=4, axes=axes, **options)
    buffers = _buffers.init(params, compression)
    key_data = _options.base_key_data(11, _options.DOMAIN_MOMENTUM, "threefry2x32")
    batched = jax.jit(lambda c: {k: getattr(v, "arrays", None) for k, v in _buffers.draw(
        buffers, key_data, c, "threefry2x32").items()})(5)
    alone = flora_optax.projections(params, 4, 5, 11, axes=axes, **options)
    for name in params:
      if alone[name] is None:
        assert not _buffers.is_compressed(buffers[name])
        continue
      for part, mat in batched[name].items():
        if options.get("projection") == "orthogonal":  # a batched QR may round differently
          np.testing.assert_allclose(mat, alone[name][part], rtol=1e-5, atol=1e-6)
        else:
          np.testing.assert_array_equal(mat, alone[name][part], err_msg=f"{options} {name}")
