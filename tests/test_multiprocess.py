"""Flora under ``jax.distributed``: 2 processes on this machine, checkpoints across topologies.

Every run is ``tests/multiprocess/worker.py`` in fresh processes (the device count and the
distributed runtime are fixed per process), started here with a time limit and killed on
failure or timeout:

1. one process, one device: the unsharded reference of every config, and a checkpoint saved
   in the middle of an accumulation cycle;
2. two processes with 2 CPU devices each (gloo collectives, coordinator on a free port): every
   config with the parameters and the optimizer state sharded over a mesh axis of all 4
   devices and host-local batches; a checkpoint saved mid-cycle by both processes, and the
   one-process checkpoint of 1. restored onto the 4 devices and run to the end;
3. one process with 4 devices and one with 1 device: the two-process checkpoint restored
   and run to the end;
4. three 2-process runs at once, in each of which process 1 is built with another ``seed``,
   ``rank`` or ``kappa``: ``flora_optax.check_processes_agree`` must raise on both processes.

The workers write their measurements to files; the assertions are made here.
"""

import collections
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import flora_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multiprocess" / "worker.py"
TIMEOUT_S = 120  # per run (each takes 5-40 s on 2 busy cores)
SAVE_AT = 5      # the micro-step after which the "accumulate" checkpoints are saved
CONFIGS = ["accumulate", "momentum_chain", "microbatch"]
if hasattr(flora_optax, "flora_adamw"):
  CONFIGS.append("adamw")
# The configs whose state holds Flora's compressed buffers of the three weight matrices
# ("accumulate" is flora_accumulate around flora_adafactor).
FLORA_STATES = ("accumulate", "momentum_chain", "adamw")
MISMATCHED = ["seed", "rank", "kappa"]  # the option process 1 sets differently

# The module-scoped fixtures (the multi-process launches) run once per xdist worker that runs
# a test of this module: with --dist loadgroup the whole module runs on one worker.
pytestmark = pytest.mark.xdist_group("test_multiprocess")


# A one-process distributed start with gloo collectives: it fails at once, with the reason,
# where this jaxlib has no gloo (public API only; a few seconds).
_GLOO_PROBE = """
import socket, sys, jax
s = socket.socket(); s.bind(("localhost", 0)); port = s.getsockname()[1]; s.close()
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
print(jax.numpy.sum(jax.numpy.ones(3)), jax.process_count())
jax.distributed.shutdown()
"""


def _gloo_unavailable() -> str | None:
  """None where multi-process CPU runs work here, else why not."""
  proc = subprocess.run([sys.executable, "-c", _GLOO_PROBE], env=_env(), capture_output=True,
                        text=True, timeout=120, check=False)
  return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module", autouse=True)
def _needs_gloo():
  reason = _gloo_unavailable()
  if reason is not None:
    pytest.skip(f"multi-process runs on CPU need gloo collectives, which this JAX cannot "
                f"start: {reason}")


def _free_ports(n: int) -> list[int]:
  """`n` different ports that were free a moment ago (for the coordinators)."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("localhost", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _env():
  # The workers choose their own device count: drop a forced one from the environment.
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
              PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def launch(out, tag, commands, group_size=None, timeout=TIMEOUT_S, grace=15.0):
  """Runs the worker once per argument list, all at once; returns [(returncode, log)].

  The processes form groups of `group_size` (default: all of them), the processes of one
  distributed run. Every process is killed, with its process group, once `timeout` seconds
  have passed, or `grace` seconds after another one of its group failed (its peers would
  otherwise wait for it in a collective until the runtime's own timeouts).
  """
  group_size = group_size or len(commands)
  procs = []
  try:
    for i, args in enumerate(commands):
      log = open(out / f"log_{tag}_{i}.txt", "w+b")  # pylint: disable=consider-using-with
      procs.append((subprocess.Popen(
          [sys.executable, str(WORKER), *args, "--out", str(out)], cwd=ROOT, env=_env(),
          stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline, failed_at = time.monotonic() + timeout, {}
    while any(p.poll() is None for p, _ in procs):
      now = time.monotonic()
      if now > deadline:
        break
      for i, (p, _) in enumerate(procs):
        group = i // group_size
        if p.poll() not in (None, 0):
          failed_at.setdefault(group, now)
        elif p.poll() is None and now > failed_at.get(group, now) + grace:
          _kill(p)
      time.sleep(0.05)
  finally:
    for p, _ in procs:
      _kill(p)
  results = []
  for p, log in procs:
    log.seek(0)
    results.append((p.returncode, log.read().decode(errors="replace")))
    log.close()
  return results


def _kill(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
    proc.wait()


def launch_ok(out, tag, commands):
  results = launch(out, tag, commands)
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f"{tag} process {i} exited with {rc} (-9: killed):\n{log[-5000:]}"


def distributed(port, processes, *args):
  return [[*args, "--port", str(port), "--processes", str(processes), "--process-id", str(i)]
          for i in range(processes)]


def load(out, tag):
  with np.load(out / f"results_{tag}.npz") as data:
    results = dict(data)
  return results, json.loads((out / f"info_{tag}.json").read_text())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  path = tmp_path_factory.mktemp("multiprocess")
  (path / "ckpt").mkdir()
  return path


@pytest.fixture(scope="module")
def reference(out):
  launch_ok(out, "reference", [["reference", "--devices", "1"]])
  return load(out, "reference")


@pytest.fixture(scope="module")
def two_processes(out, reference):  # needs the reference's checkpoint
  del reference
  launch_ok(out, "train", distributed(_free_ports(1)[0], 2, "train", "--devices", "2"))
  return [load(out, i) for i in range(2)]


@pytest.fixture(scope="module")
def restored(out, two_processes):  # needs the two-process checkpoint
  del two_processes
  launch_ok(out, "restore", [["restore", "--devices", "4"], ["restore", "--devices", "1"]])
  return {devices: load(out, f"restore{devices}") for devices in (4, 1)}


def compare(actual, expected, what, start=0, prefix=None):
  """Floats to float tolerance, integers (counters, key data) exactly: the largest difference.

  `actual` holds the params and the optimizer state after every micro-step (keys
  ``{prefix}/{step}/{p|s}{leaf}``) of a run of config `what` that started after micro-step
  `start` and went on to the end, as the one-process reference `expected` did.
  """
  prefix = prefix or what
  keys = {f"{what}/{k.split('/', 1)[1]}": k for k in actual if k.startswith(prefix + "/")}
  wanted = {k for k in expected if k.startswith(what + "/") and int(k.split("/")[1]) > start}
  assert keys.keys() == wanted, sorted(wanted ^ keys.keys())
  largest = 0.0
  for ref_key, key in keys.items():
    value, ref = actual[key], expected[ref_key]
    assert value.shape == ref.shape and value.dtype == ref.dtype, key
    if ref.dtype.kind == "f":
      np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5, err_msg=key)
      if ref.size:
        largest = max(largest, float(np.max(np.abs(value.astype(np.float64) - ref))))
    else:
      np.testing.assert_array_equal(value, ref, err_msg=key)
  steps = sorted({int(k.split("/")[1]) for k in keys})
  print(f"\n{prefix}: params and state after micro-steps {steps[0]}-{steps[-1]}, largest "
        f"|difference| to one process {largest:.2e}")
  return largest


# ------------------------------------------------------------------ two processes


def test_two_processes_with_two_devices_each(two_processes):
  for pid, (_, info) in enumerate(two_processes):
    assert info["process_index"] == pid and info["process_count"] == 2
    assert info["local_devices"] == 2 and info["devices"] == 4
    assert info["mesh_shape"] == {"data": 4}
  # Host-local batches: each process fed its own half of the global batch.
  assert [info["batch_rows"] for _, info in two_processes] == [[0, 8], [8, 16]]


@pytest.mark.parametrize("name", CONFIGS)
def test_two_processes_match_one_process(reference, two_processes, name, record_property):
  expected, _ = reference
  for results, _ in two_processes:  # each process gathered the same global values
    record_property("largest_abs_difference", compare(results, expected, name))


def _sharded_axes(spec: str) -> list[int]:
  # "P(None, 'data', None)" -> [1]
  entries = [e.strip() for e in spec[2:-1].split(",") if e.strip()]
  return [i for i, e in enumerate(entries) if "data" in e]


def check_shards(reports, mesh_size=4):
  """`reports`: a shard report per process. Each holds only its own shards of every leaf."""
  names = reports[0].keys()
  for name in names:
    leaves = [r[name] for r in reports]
    shape, spec = leaves[0]["shape"], leaves[0]["spec"]
    sharded = _sharded_axes(spec)
    expected = [s // mesh_size if axis in sharded else s for axis, s in enumerate(shape)]
    for pid, leaf in enumerate(leaves):
      assert len(leaf["shard_shapes"]) == 2, (name, pid, leaf)  # one per local device
      assert leaf["expected_shard_shape"] == expected, (name, leaf)
      assert leaf["shard_shapes"] == [expected] * len(leaf["shard_shapes"]), (name, pid, leaf)
      if sharded:
        # Two devices, two different quarters: half of the buffer on this process.
        assert len({json.dumps(i) for i in leaf["shard_index"]}) == 2, (name, pid, leaf)
        assert 2 * leaf["process_bytes"] == leaf["global_bytes"], (name, pid, leaf)
    if sharded:
      # Together the processes hold every quarter exactly once.
      quarters = [json.dumps(i) for leaf in leaves for i in leaf["shard_index"]]
      assert len(set(quarters)) == mesh_size, (name, quarters)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_process_holds_only_its_shards(two_processes, name):
  for when in ("shards", "final_shards"):  # after init and after the last step
    reports = [info["configs"][name][when] for _, info in two_processes]
    check_shards(reports)
    if name in FLORA_STATES:
      compressed = {k: v for k, v in reports[0].items() if "compressed" in k
                    and {"w1", "w2", "stack"} & set(k.split("/"))}
      assert len(compressed) >= 3, reports[0].keys()
      for key, leaf in compressed.items():
        assert 4 in leaf["shape"] and _sharded_axes(leaf["spec"]), (key, leaf)  # rank 4


def test_allgather_detector_sees_a_gathered_weight(two_processes):
  # Control: replicating a sharded (64, 16) weight on the 2-process mesh shows up.
  for _, info in two_processes:
    assert info["control_allgathers"] == ["all-gather -> 64,16"]


@pytest.mark.parametrize("name", CONFIGS)
def test_optimizer_step_gathers_no_full_weight(two_processes, name):
  for _, info in two_processes:
    assert info["configs"][name]["full_allgathers"] == []


def test_compressed_mean_adds_no_weight_gather(two_processes):
  # The microbatched gradient step runs the model, whose FSDP forward pass may gather a
  # weight; the compressed accumulator must gather nothing more than optax's exact MEAN.
  for _, info in two_processes:
    gathers = info["configs"]["microbatch"]["grad_step_full_allgathers"]
    extra = collections.Counter(gathers["compressed"]) - collections.Counter(gathers["mean"])
    assert not extra, gathers


@pytest.mark.xfail(not hasattr(flora_optax, "check_processes_agree"), strict=False,
                   reason="flora_optax.check_processes_agree does not exist yet")
def test_processes_that_agree_pass_the_check(two_processes):
  # Each process called check_processes_agree on every config's state after init (the run
  # would have failed had it raised).
  assert all(info["has_check_processes_agree"] for _, info in two_processes)


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_are_saved_mid_cycle(out, reference, two_processes, restored):
  # One micro-gradient in the accumulator after 2 updates; and the run ends mid-cycle too.
  _, counters = reference
  assert counters == {"saved": {"mini_step": 1, "gradient_step": 2},
                      "final": {"mini_step": 1, "gradient_step": 4}}
  assert two_processes[0][1]["configs"]["accumulate"]["saved_at"] == SAVE_AT
  for devices in (4, 1):
    assert restored[devices][1]["counters"] == counters["saved"]
  # Each process wrote its own shards.
  for pid in range(2):
    files = [f for f in (out / "ckpt" / "two_process" / f"ocdbt.process_{pid}").rglob("*")
             if f.is_file()]
    assert sum(f.stat().st_size for f in files) > 0, pid


@pytest.mark.parametrize("devices", [4, 1])
def test_two_processes_to_one_process(reference, restored, devices, record_property):
  expected, _ = reference
  results, info = restored[devices]
  largest = compare(results, expected, "accumulate", start=SAVE_AT,
                    prefix=f"accumulate_restored_on_{devices}")
  record_property("largest_abs_difference", largest)
  # Restored with the shardings of the new mesh: the compressed buffers on `devices`.
  for key, leaf in info["restored"].items():
    if "compressed" in key and "w1" in key.split("/"):
      assert leaf["shard_shapes"] == [[64 // devices, 4]] * devices, (key, leaf)


def test_one_process_to_two_processes(reference, two_processes, record_property):
  expected, _ = reference
  for results, info in two_processes:
    largest = compare(results, expected, "accumulate", start=SAVE_AT,
                      prefix="accumulate_from_one_process")
    record_property("largest_abs_difference", largest)
  check_shards([info["restored_from_one_process"] for _, info in two_processes])


# ------------------------------------------------------------------ disagreement


@pytest.fixture(scope="module")
def disagreements(out):
  """Three 2-process runs at once; in each, process 1 is built with another option."""
  commands = [args for option, port in zip(MISMATCHED, _free_ports(len(MISMATCHED)))
              for args in distributed(port, 2, "agree", "--mismatch", option)]
  results = launch(out, "agree", commands, group_size=2)
  return {option: results[2 * i:2 * i + 2] for i, option in enumerate(MISMATCHED)}


@pytest.mark.xfail(not hasattr(flora_optax, "check_processes_agree"), strict=False,
                   reason="flora_optax.check_processes_agree does not exist yet")
@pytest.mark.parametrize("option", MISMATCHED)
def test_processes_that_disagree_are_caught(disagreements, option):
  for pid, (rc, log) in enumerate(disagreements[option]):
    assert rc not in (0, -signal.SIGKILL), f"process {pid} exited with {rc}:\n{log[-3000:]}"
    error = [line for line in log.splitlines() if line.startswith("ValueError")]
    assert error, f"process {pid} did not raise ValueError:\n{log[-3000:]}"
    assert re.search(rf"\b{option}\b", error[-1]), error[-1]
