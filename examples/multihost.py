"""Multi-host training with Flora: one script for local processes, SLURM and TPU pods.

An MLP regression model is sharded FSDP-style over every device of every process; each
process feeds only its own rows of each batch; the optimizer is Flora Adafactor (compressed
momentum) inside Flora accumulation (compressed gradient mean over ``--accumulate``
micro-steps). Every process prints the bytes of the optimizer state it holds against the
global state, and process 0 prints the loss after each update.

Launch it as N processes on this machine (CPU, ``--devices-per-process`` devices each; the
script starts the processes itself, with a free port for the coordinator)::

    python examples/multihost.py --processes 2

or once per host (or per task) of a cluster, where ``jax.distributed.initialize()`` finds
the coordinator, the process count and this process's id by itself::

    srun --nodes=2 --ntasks-per-node=1 python examples/multihost.py --cluster       # SLURM
    gcloud compute tpus tpu-vm ssh NAME --worker=all \\
        --command="python examples/multihost.py --cluster"                           # TPU pod

``--processes 1`` runs the same training in one process (no ``jax.distributed``): its losses
equal the multi-process ones to float rounding, since the data of a step does not depend on
how many processes read it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--processes", type=int, default=2,
                      help="local processes to start (ignored with --cluster)")
  parser.add_argument("--devices-per-process", type=int, default=2,
                      help="CPU devices of each local process")
  parser.add_argument("--cluster", action="store_true",
                      help="started by SLURM, on a TPU pod, ...: jax.distributed.initialize() "
                           "with no arguments")
  parser.add_argument("--steps", type=int, default=32, help="micro-steps")
  parser.add_argument("--accumulate", type=int, default=4, help="micro-steps per update")
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-2, help="Adafactor's relative step size")
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32, help="global micro-batch size")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the parameters and of Flora's projections: the same on "
                           "every process")
  # Set by the local launcher for its children.
  parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ------------------------------------------------------------------ local launcher


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_local(args) -> int:
  """Starts `args.processes` copies of this script as the processes of one run."""
  coordinator = f"localhost:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  children = [
      subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
           "--process-id", str(i), "--coordinator", coordinator],
          env=env, start_new_session=True)
      for i in range(args.processes)]
  failed_at = None
  try:
    while any(c.poll() is None for c in children):
      if failed_at is None and any(c.poll() not in (None, 0) for c in children):
        failed_at = time.monotonic()
      if failed_at is not None and time.monotonic() > failed_at + 10:
        break  # the others would wait for the failed one in a collective
      time.sleep(0.1)
  finally:  # failure, Ctrl-C: no process is left behind
    for c in children:
      if c.poll() is None:
        os.killpg(c.pid, signal.SIGKILL)  # the child leads its own process group
        c.wait()
  codes = [c.returncode for c in children]
  return next((code for code in codes if code != 0), 0)


# ------------------------------------------------------------------ one process of the run


def main(args):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives
  if args.cluster:
    jax.distributed.initialize()  # SLURM, TPU pods, Open MPI, ...: all from the environment
  else:
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    if args.process_id is not None:
      jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
  train(args)


def train(args):
  pid, n_proc = jax.process_index(), jax.process_count()

  def say(msg):
    print(f"[process {pid}/{n_proc}] {msg}", flush=True)

  # One mesh axis over all devices of all processes: parameters FSDP-sharded over it,
  # batches split over it.
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  d_in, width, d_out = args.width // 4, args.width, args.width // 4
  shapes = {"w1": (d_in, width), "b1": (width,), "w2": (width, width), "b2": (width,),
            "w3": (width, d_out)}

  def spec(shape):
    # Shard the side Flora does not compress (the larger one, with side="smaller"), so the
    # compressed buffers stay sharded too; replicate what the mesh does not divide.
    if len(shape) == 1:
      return P("data") if shape[0] % mesh.size == 0 else P()
    axis = 0 if shape[0] >= shape[1] else 1
    if shape[axis] % mesh.size:
      return P()
    return P("data", None) if axis == 0 else P(None, "data")

  param_shardings = {k: NamedSharding(mesh, spec(s)) for k, s in shapes.items()}
  batch_sharding = NamedSharding(mesh, P("data"))

  def init_params(key):
    keys = jax.random.split(key, len(shapes))
    return {k: (jax.random.normal(kk, s) / math.sqrt(s[0]) if len(s) == 2 else jnp.zeros(s))
            for kk, (k, s) in zip(keys, shapes.items())}

  # The same key on every process (never fold in jax.process_index()): each process
  # computes only its own shards of the same global parameters.
  params = jax.jit(init_params, out_shardings=param_shardings)(jax.random.key(args.seed))

  tx = flora_optax.flora_accumulate(
      flora_optax.flora_adafactor(args.lr, rank=args.rank, momentum=0.9, kappa=20,
                                  seed=args.seed),
      every_k_schedule=args.accumulate, rank=args.rank, seed=args.seed)
  state_shardings = flora_optax.state_shardings(tx, params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  # Collective: raises on every process if one was built with another seed, rank, kappa...
  flora_optax.check_processes_agree(opt_state)

  held, total = addressable_bytes(opt_state), flora_optax.state_bytes(opt_state)
  naive = optax.MultiSteps(optax.adafactor(args.lr, momentum=0.9), args.accumulate)
  naive_total = flora_optax.state_bytes(jax.eval_shape(naive.init, params))
  say(f"{jax.local_device_count()} of {jax.device_count()} devices | optimizer state: "
      f"{held:,} B on this process of {total:,} B global ({held / total:.0%}); "
      f"MultiSteps(adafactor(momentum=0.9)) would be {naive_total:,} B global | parameters: "
      f"{addressable_bytes(params):,} B of {flora_optax.state_bytes(params):,} B")

  teacher = np.random.default_rng(args.seed).standard_normal((d_in, d_out)) / math.sqrt(d_in)
  lo, hi = local_rows(batch_sharding, args.batch)

  def host_local_batch(step):
    # Only this process's rows are made (or read from disk, in a real job); row i of
    # step s is the same whichever process reads it.
    x = np.stack([np.random.default_rng([args.seed, step, i]).standard_normal(d_in)
                  for i in range(lo, hi)]).astype(np.float32)
    y = np.tanh(x @ teacher).astype(np.float32)
    return tuple(jax.make_array_from_process_local_data(batch_sharding, a,
                                                        (args.batch,) + a.shape[1:])
                 for a in (x, y))

  def loss_fn(params, x, y):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    h = jax.nn.gelu(h @ params["w2"] + params["b2"])
    return jnp.mean((h @ params["w3"] - y) ** 2)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, in_shardings=(param_shardings, state_shardings, batch_sharding,
                                     batch_sharding),
                 out_shardings=(param_shardings, state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0, 1))
  losses = []
  for i in range(args.steps):
    params, opt_state, loss = step(params, opt_state, *host_local_batch(i))
    losses.append(float(loss))  # replicated: every process has it
    if (i + 1) % args.accumulate == 0 and pid == 0:
      say(f"update {(i + 1) // args.accumulate}: mean loss of its {args.accumulate} "
          f"micro-batches {np.mean(losses[-args.accumulate:]):.5f}")
  say("done")


def addressable_bytes(tree) -> int:
  """Bytes of the pieces of `tree` on this process's devices (each distinct piece once)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += sum({str(s.index): s.data.nbytes for s in leaf.addressable_shards}.values())
  return total


def local_rows(sharding, batch):
  """The contiguous rows of a global batch of `batch` rows on this process's devices."""
  slices = sharding.addressable_devices_indices_map((batch,)).values()
  starts = sorted({s[0].start or 0 for s in slices})
  stops = sorted({batch if s[0].stop is None else s[0].stop for s in slices})
  if any(a != b for a, b in zip(starts[1:], stops[:-1])):
    raise ValueError(f"this process's rows are not contiguous: {starts}, {stops}")
  return starts[0], stops[-1]


if __name__ == "__main__":
  ARGS = parse_args()
  if not ARGS.cluster and ARGS.process_id is None and ARGS.processes > 1:
    sys.exit(launch_local(ARGS))
  main(ARGS)
