"""flora_optax.state_shardings, and Flora under real sharding on 8 virtual CPU devices.

The rules of ``state_shardings`` are checked here on a one-device mesh (partition specs are
a static matter). The multi-device checks need ``--xla_force_host_platform_device_count=8``
before JAX is imported, so they run ``tests/multidevice/check_sharding.py`` once in a
subprocess and assert on the measurements it prints.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax
from tests.conftest import buffer

# The module-scoped fixtures (the 8-device subprocess run) run once per xdist worker that runs
# a test of this module: with --dist loadgroup the whole module runs on one worker.
pytestmark = pytest.mark.xdist_group("test_sharding")

ROOT = pathlib.Path(__file__).resolve().parent.parent
RANK = 4


@pytest.fixture(scope="module")
def mesh():
  # Axis sizes of 1: every spec is valid on one device, and the specs are what is tested.
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def named(mesh, specs):
  return {k: NamedSharding(mesh, v) for k, v in specs.items()}


PARAMS = {
    "tall": jnp.zeros((32, 16)),         # side "smaller" compresses the columns
    "wide": jnp.zeros((16, 32)),         # ... and here the rows
    "bias": jnp.zeros((16,)),
    "stack": jnp.zeros((3, 32, 16)),     # scanned layers, viewed with batch=0
    "qkv": jnp.zeros((16, 4, 8)),        # DenseGeneral (embed, heads, head_dim)
}
# `axes` is a prefix tree of the parameters: None keeps the default view.
AXES = {"tall": None, "wide": None, "bias": None,
        "stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0),
        "qkv": flora_optax.MatrixAxes(rows=0, cols=(1, 2))}
SPECS = {"tall": P("data", None), "wide": P("data", None), "bias": P("model"),
         "stack": P(None, "data", "model"), "qkv": P(None, "model", None)}
# Compressed buffers: the rank axis is replicated, the uncompressed side keeps its sharding.
# tall (32, 4): rows kept.  wide (4, 32): the sharded rows were compressed -> replicated.
# stack (3, 32, 4): batch and rows kept, the sharded columns compressed.
# qkv (4, 32): the columns group (heads, head_dim) keeps the sharding of heads.
COMPRESSED_SPECS = {"tall": P("data", None), "wide": P(None, None), "bias": P("model"),
                    "stack": P(None, "data", None), "qkv": P(None, "model")}


def specs_of(tree):
  return {k: buffer(v).spec for k, v in tree.items()}


def test_momentum_buffers_follow_the_uncompressed_side(mesh):
  tx = flora_optax.flora_momentum(RANK, axes=AXES)
  shardings = flora_optax.state_shardings(tx, PARAMS, named(mesh, SPECS))
  state = jax.eval_shape(tx.init, PARAMS)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  assert specs_of(shardings.compressed_mu) == COMPRESSED_SPECS
  assert shardings.count.spec == P() and shardings.key_data.spec == P()
  # Sanity: the buffers really are the compressed shapes the specs were written for.
  assert buffer(state.compressed_mu["qkv"]).shape == (RANK, 32)
  assert buffer(state.compressed_mu["stack"]).shape == (3, 32, RANK)


def test_accumulate_and_wrapped_adafactor_state(mesh):
  tx = flora_optax.flora_accumulate(
      flora_optax.flora_adafactor(1e-2, RANK, axes=AXES, min_dim_size_to_factor=8), 2, RANK,
      axes=AXES, sketch="projection")   # the projection buffers of COMPRESSED_SPECS
  shardings = flora_optax.state_shardings(tx, PARAMS, named(mesh, SPECS))
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(tx.init, PARAMS))
  assert specs_of(shardings.compressed_acc) == COMPRESSED_SPECS
  factored, momentum = shardings.inner_opt_state[0], shardings.inner_opt_state[1]
  assert specs_of(momentum.compressed_mu) == COMPRESSED_SPECS
  # Adafactor factors the two largest axes: v_row drops the largest, v_col the other one.
  assert factored.v_row["tall"].spec == P(None)            # (16,): axis 0 dropped
  assert factored.v_col["tall"].spec == P("data")          # (32,): axis 1 dropped
  assert factored.v_row["stack"].spec == P(None, "model")  # (3, 16)
  assert factored.v_col["stack"].spec == P(None, "data")   # (3, 32)
  # Unfactored leaves keep a full-size v with the parameter's sharding.
  assert factored.v["bias"].spec == P("model")


def test_uncompressed_and_plain_optax_buffers_get_the_param_sharding(mesh):
  tx = optax.chain(flora_optax.flora_momentum(RANK, mask=False), optax.ema(0.9))
  shardings = flora_optax.state_shardings(tx, PARAMS, named(mesh, SPECS))
  assert specs_of(shardings[0].compressed_mu) == SPECS
  assert specs_of(shardings[1].ema) == SPECS


def test_single_sharding_for_every_param_and_jitted_init(mesh):
  params = {"w": jnp.ones((32, 16)), "b": jnp.ones((16,))}
  tx = flora_optax.flora_momentum(RANK)
  shardings = flora_optax.state_shardings(tx, params, NamedSharding(mesh, P("data")))
  assert buffer(shardings.compressed_mu["w"]).spec == P("data", None)
  assert shardings.compressed_mu["b"].spec == P("data")
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert buffer(state.compressed_mu["w"]).sharding == buffer(shardings.compressed_mu["w"])


def test_the_layout_comes_from_the_state_not_from_shapes(mesh):
  """A (3, 32, 16) stack viewed as a batch of matrices: the transform's own `axes` decide the
  buffer's layout; state_shardings needs no second copy of them and warns about nothing."""
  params = {"stack": PARAMS["stack"]}
  tx = flora_optax.flora_momentum(RANK, axes={"stack": AXES["stack"]})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    shardings = flora_optax.state_shardings(tx, params, named(mesh, {"stack": SPECS["stack"]}))
  assert buffer(shardings.compressed_mu["stack"]).spec == P(None, "data", None)


def test_two_sided_buffers_keep_each_sides_sharding(mesh):
  """Range sketch (N, k) keeps the long side's sharding, co-range (l, M) the short side's."""
  params = {"tall": jnp.zeros((64, 32)), "wide": jnp.zeros((32, 64))}
  specs = {"tall": P("data", "model"), "wide": P("data", "model")}
  tx = flora_optax.flora_momentum(8, sketch="two_sided")
  shardings = flora_optax.state_shardings(tx, params, named(mesh, specs))
  tall, wide = shardings.compressed_mu["tall"].parts, shardings.compressed_mu["wide"].parts
  assert (tall["range"].spec, tall["corange"].spec) == (P("data", None), P(None, "model"))
  assert (wide["range"].spec, wide["corange"].spec) == (P("model", None), P(None, "data"))


def test_rejects_shardings_that_are_not_named():
  params = {"w": jnp.ones((32, 16))}
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(TypeError, match=r"params\['w'\].*NamedSharding"):
    flora_optax.state_shardings(flora_optax.flora_momentum(RANK), params, {"w": single})
  with pytest.raises(ValueError, match="structure of params"):
    flora_optax.state_shardings(flora_optax.flora_momentum(RANK), params, {"v": single})


# ------------------------------------------------------------------ 8 virtual devices


@pytest.fixture(scope="module")
def multidevice():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "multidevice" / "check_sharding.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


MESHES = ("fsdp", "tp", "2d")


@pytest.mark.parametrize("name", MESHES)
def test_sharded_steps_match_one_device(multidevice, name):
  # Six jitted micro-steps (three inner updates, one momentum resample) of a Flora Adafactor
  # with compressed accumulation; only the order of floating-point sums may differ.
  result = multidevice[name]
  assert result["max_abs_diff"] < 1e-5 * max(1.0, result["max_abs_params"])


# Which buffers must be sharded, and over how many devices, for each mesh (see
# check_sharding.py for the parameter specs): the uncompressed side keeps the parameter's
# sharding, a sharded compressed side becomes replicated.
EXPECTED_SHARDS = {
    "fsdp": {"tall": 8, "wide": 1, "stack": 8, "bias": 1},
    "tp": {"tall": 1, "wide": 8, "stack": 1, "bias": 8},
    "2d": {"tall": 2, "wide": 4, "stack": 2, "bias": 4},
}


@pytest.mark.parametrize("name", MESHES)
def test_compressed_buffers_are_sharded(multidevice, name):
  for buffer_name, buffer in multidevice[name]["buffers"].items():
    shards = EXPECTED_SHARDS[name][buffer_name.split("/")[1]]
    assert buffer["per_device_bytes"] * shards == buffer["total_bytes"], (buffer_name, buffer)
  # The compressed ones really are (rank x side): 8 of 64 or 128.
  assert multidevice[name]["buffers"]["momentum/tall"]["shape"] == [128, 8]
  assert multidevice[name]["buffers"]["accumulator/wide"]["shape"] == [8, 128]


@pytest.mark.parametrize("sketch", ["two_sided", "factors"])
@pytest.mark.parametrize("name", MESHES)
def test_two_sided_sketch_and_factors_under_sharding(multidevice, name, sketch):
  result = multidevice[name][sketch]
  assert result["max_abs_diff"] < 1e-4, result
  assert result["full_allgathers"] == []


def test_allgather_detector_sees_a_gathered_weight(multidevice):
  # Control: replicating an FSDP-sharded weight shows up as an all-gather of its shape.
  assert multidevice["control_allgathers"]


@pytest.mark.parametrize("name", MESHES)
def test_optimizer_gathers_no_full_weight(multidevice, name):
  assert multidevice[name]["full_allgathers"] == []


@pytest.mark.parametrize("name", MESHES)
def test_projections_do_not_depend_on_sharding(multidevice, name):
  assert multidevice[name]["projections_equal"] == {"gaussian": True, "rademacher": True}
