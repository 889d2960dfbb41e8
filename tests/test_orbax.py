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
import orbax.checkpoint as ocp
import pytest

import flora_optax
from tests.conftest import buffer

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
  assert np.any(np.asarray(buffer(acc.compressed_acc["w1"])) != 0)


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
      np.testing.assert_allclose(resumed[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
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
