"""Orbax checkpoints of Flora states: save mid-cycle, restore in a new process, continue.

The optimizer state holds compressed buffers, counters and PRNG key data, never a projection:
a restored state must regenerate the very same projections, so a resumed run is identical,
bit for bit, to the uninterrupted one (same device layout), and equal to float tolerance when
restored sharded onto 8 devices. The training run is ``tests/multidevice/orbax_resume.py``.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flora_optax
from tests.conftest import buffer

# The module-scoped fixtures (the uninterrupted runs and their checkpoints) run once per
# xdist worker that runs a test of this module: with --dist loadgroup the whole module runs
# on one worker.
pytestmark = pytest.mark.xdist_group("test_orbax")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "multidevice" / "orbax_resume.py"


def _load_script():
  spec = importlib.util.spec_from_file_location("orbax_resume", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


resume = _load_script()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Runs every config to the end here, saving a checkpoint at its `save_at` micro-step."""
  ckpt_root = tmp_path_factory.mktemp("flora_ckpt")
  expected, saved_states = {}, {}
  for name, (make_tx, save_at, total) in resume.CONFIGS.items():
    tx = make_tx()
    step = resume.make_step(tx)
    params = resume.init_params()
    params, opt_state, _ = resume.run(step, params, tx.init(params), 0, save_at)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(ckpt_root / name, {"params": params, "opt_state": opt_state})
    saved_states[name] = opt_state
    _, opt_state, trajectory = resume.run(step, params, opt_state, save_at, total)
    expected.update(resume.flat(name, trajectory, opt_state))
  return ckpt_root, expected, saved_states


def _resume_in_subprocess(ckpt_root, out_path, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt_root), str(out_path), *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with np.load(out_path) as data:
    return dict(data)


def test_checkpoints_are_saved_mid_cycle(uninterrupted):
  # The checkpoints really sit where a bug would show: inside an accumulation cycle, and
  # before a momentum resample that happens only after the restore.
  _, _, states = uninterrupted
  acc = states["accumulate"]
  assert int(acc.mini_step) == 1 and int(acc.gradient_step) == 2
  momentum = states["momentum"][1]
  assert isinstance(momentum, flora_optax.FloraMomentumState)
  assert int(momentum.count) == 6  # kappa = 4: the next resample is at count 8
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(acc.compressed_acc["w1"]))


def test_resume_in_new_process_is_bit_identical(uninterrupted, tmp_path):
  ckpt_root, expected, _ = uninterrupted
  resumed = _resume_in_subprocess(ckpt_root, tmp_path / "resumed.npz")
  assert resumed.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_resume_sharded_on_8_devices(uninterrupted, tmp_path):
  ckpt_root, expected, _ = uninterrupted
  resumed = _resume_in_subprocess(ckpt_root, tmp_path / "sharded.npz", "--devices", "8")
  for name in resume.CONFIGS:
    # Restored as asked: the compressed stack buffer (2, 32, 4) is sharded on its rows.
    assert str(resumed.pop(f"{name}/stack_spec")) == "P(None, 'data', None)"
  assert resumed.keys() == expected.keys()
  for key, value in expected.items():
    if value.dtype.kind == "f":
      # Sharded reductions round differently: float32 tolerance at the array's own scale
      # (the online factors' QRs carry it into small entries of a leaf whose entries reach 3).
      scale = max(1.0, float(np.abs(value).max()))
      np.testing.assert_allclose(resumed[key], value, rtol=1e-4, atol=2e-6 * scale, err_msg=key)
    else:  # counters and key data
      np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_restored_key_data_regenerates_the_same_projection(uninterrupted):
  ckpt_root, _, states = uninterrupted
  make_tx = resume.CONFIGS["momentum"][0]
  params = resume.init_params()
  abstract = {"params": jax.eval_shape(lambda p: p, params),
              "opt_state": jax.eval_shape(make_tx().init, params)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(ckpt_root / "momentum", abstract)
  saved = states["momentum"][1]
  np.testing.assert_array_equal(restored["opt_state"][1].key_data, saved.key_data)
  assert restored["opt_state"][1].key_data.dtype == saved.key_data.dtype


# ------------------------------------------------------------------ layout records (0.2.0)

DATA = ROOT / "tests" / "data"
_old = importlib.util.spec_from_file_location("make_old_checkpoint",
                                              DATA / "make_old_checkpoint.py")
old = importlib.util.module_from_spec(_old)
_old.loader.exec_module(old)


def _abstract(tx):
  return {"params": jax.eval_shape(old.params),
          "opt_state": jax.eval_shape(tx.init, old.params())}


# The options that read a state written before layout records (the Gaussian projection), for
# momentum with the old emit too, so the run continues with the same updates.
OLD_OPTIONS = {"momentum": dict(projection="gaussian", emit="compressed"),
               "accumulate": dict(sketch="projection", projection="gaussian")}


def _old_transform(name, **options):
  if name == "momentum":
    return flora_optax.flora_momentum(4, 0.9, kappa=2, seed=1, **options)
  return flora_optax.flora_accumulate(optax.sgd(0.1), 2, 4, seed=1, **options)


@pytest.mark.parametrize("name", ["momentum", "accumulate"])
def test_a_state_without_layout_is_refused_by_the_new_defaults_naming_the_option(name):
  with pytest.raises(ValueError, match="projection='gaussian' to read it") as info:
    flora_optax.restore(DATA / "pre_layout" / name, _abstract(_old_transform(name)))
  assert "records no layout" in str(info.value)
  if name == "accumulate":   # the two-sided default: the sketch must be named too
    assert "sketch='projection', projection='gaussian' to read it" in str(info.value)
  # Plain orbax refuses it too (the target has a `layout` the checkpoint lacks).
  with ocp.StandardCheckpointer() as checkpointer, pytest.raises(ValueError, match="layout"):
    checkpointer.restore(DATA / "pre_layout" / name, _abstract(_old_transform(name)))


@pytest.mark.parametrize("name", ["momentum", "accumulate"])
def test_a_state_without_layout_continues_its_run_with_the_options_named(name):
  tx = _old_transform(name, **OLD_OPTIONS[name])
  restored = flora_optax.restore(DATA / "pre_layout" / name, _abstract(tx))
  state, params = restored["opt_state"], restored["params"]
  assert int(state.layout) == int(tx.init(old.params()).layout)
  recorded = np.load(DATA / "pre_layout" / "updates.npz")
  for step in range(old.SAVE_AT, old.SAVE_AT + old.AFTER):
    updates, state = tx.update(old.grads(step), state, params)
    for leaf, value in updates.items():   # what the old version emitted, bit for bit
      np.testing.assert_array_equal(np.asarray(value), recorded[f"{name}/{step}/{leaf}"])


def test_unrecorded_layout_reads_a_state_without_layout_into_other_options():
  tx = _old_transform("momentum", projection="orthogonal")
  with pytest.raises(ValueError, match="unrecorded_layout=True"):
    flora_optax.restore(DATA / "pre_layout" / "momentum", _abstract(tx))
  restored = flora_optax.restore(DATA / "pre_layout" / "momentum", _abstract(tx),
                                 unrecorded_layout=True)
  assert int(restored["opt_state"].layout) == int(tx.init(old.params()).layout)


@pytest.mark.parametrize("name", ["momentum", "accumulate"])
def test_a_0_1_0_state_is_refused_whatever_the_options(name):
  for options in ({}, OLD_OPTIONS[name]):
    with pytest.raises(ValueError, match="written by flora_optax 0.1.0.*no option of 0.2"):
      flora_optax.restore(DATA / "v0_1_0" / name, _abstract(_old_transform(name, **options)))


def test_a_state_saved_under_other_options_is_refused_by_name(tmp_path):
  params = old.params()
  saved = _old_transform("momentum", projection="gaussian")
  state = saved.init(params)
  state = saved.update(old.grads(0), state, params)[1]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  target = _abstract(_old_transform("momentum"))   # the DCT projection
  with pytest.raises(ValueError, match="saved with sketch='projection', projection='gaussian'"
                     ".*reads sketch='projection', projection='dct'"):
    flora_optax.restore(tmp_path / "ckpt", target)
  # Restored by plain orbax (which cannot tell), check_layout refuses it, and so does an
  # eager update; the same options read it.
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", target)
  with pytest.raises(ValueError, match="projection='gaussian' to read it"):
    flora_optax.check_layout(restored)
  with pytest.raises(ValueError, match="flora_momentum: the state was saved with"):
    _old_transform("momentum").update(old.grads(1), restored["opt_state"], params)
  same = flora_optax.restore(tmp_path / "ckpt", _abstract(saved))
  flora_optax.check_layout(same)


def test_check_layout_finds_states_nested_in_aliases_and_ignores_uncompressed_ones():
  params = old.params()
  saved = flora_optax.flora_adamw(1e-3, 4, projection="gaussian").init(params)
  fresh = flora_optax.flora_adamw(1e-3, 4).init(params)
  flora_optax.check_layout(fresh)
  # `fresh` with the layout record of `saved`, nested in flora_adamw's chain state
  mixed = (fresh[0]._replace(mu=fresh[0].mu._replace(layout=saved[0].mu.layout)),) + fresh[1:]
  with pytest.raises(ValueError, match="saved with sketch='projection', projection='gaussian'"):
    flora_optax.check_layout(mixed)
  masked = flora_optax.flora_momentum(4, mask=False).init(params)   # compresses nothing
  flora_optax.check_layout(masked._replace(layout=masked.layout + 1))
