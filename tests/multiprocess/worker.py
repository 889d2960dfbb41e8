"""Flora under ``jax.distributed``: the processes that ``tests/test_multiprocess.py`` starts.

One script, four roles (``--out DIR`` receives ``results_*.npz``, ``info_*.json`` and the
checkpoints under ``DIR/ckpt``; PORT is a free port for the coordinator):

    # 1 process, 1 device: every config unsharded (the reference), and the "accumulate"
    # run's checkpoint saved in the middle of an accumulation cycle (ckpt/one_process).
    python tests/multiprocess/worker.py reference --devices 1 --out DIR

    # 2 processes x 2 CPU devices: every config sharded over the 4 devices, a mid-cycle
    # checkpoint written by both (ckpt/two_process), ckpt/one_process restored and run on.
    python tests/multiprocess/worker.py train --devices 2 --port PORT --process-id {0,1} ...

    # 1 process with N devices: ckpt/two_process restored and run to the end.
    python tests/multiprocess/worker.py restore --devices N --out DIR

    # 2 processes, process 1 built with another `seed`, `rank` or `kappa`:
    # flora_optax.check_processes_agree must raise on both.
    python tests/multiprocess/worker.py agree --mismatch seed --port PORT --process-id {0,1}

Importing it changes no JAX setting: the device count, the CPU collectives (gloo) and
``jax.distributed.initialize`` are set up in ``main``. The test makes the assertions.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

RANK = 4
GLOBAL_BATCH = 16
MICROBATCH = 4
SHAPES = {"w1": (64, 16), "b1": (16,), "stack": (2, 64, 16), "w2": (16, 64)}
AXES = {"w1": None, "b1": None, "stack": flora_optax.MatrixAxes(rows=1, cols=2, batch=0),
        "w2": None}
# One mesh axis, "data", over every device of every process: the parameters are sharded over
# it FSDP-style (on the larger side, which Flora does not compress, so every compressed
# buffer stays sharded 4 ways) and the batches are split over it.
SPECS = {"w1": P("data", None), "b1": P("data"), "stack": P(None, "data", None),
         "w2": P(None, "data")}
BATCH_SPEC = P("data")


def adafactor(seed=0, rank=RANK, kappa=2, **kwargs):
  return flora_optax.flora_adafactor(1e-2, rank, momentum=0.9, kappa=kappa, seed=seed,
                                     min_dim_size_to_factor=8, axes=AXES, **kwargs)


@dataclasses.dataclass(frozen=True)
class Config:
  make: Callable[[], optax.GradientTransformation]
  steps: int
  microbatch: bool = False  # gradients averaged by compressed_mean inside the step
  save_at: int | None = None  # micro-step after which a checkpoint is saved


def configs():
  out = {
      # flora_accumulate over 2 micro-steps around flora_adafactor, whose momentum is
      # resampled every 2 updates (at the update of micro-step 6). The checkpoints are saved
      # after micro-step 5, with one micro-gradient in the accumulator; the run ends after
      # micro-step 9, in the middle of its fifth cycle.
      # The projection (sketch="projection"; the accumulation's default is two-sided):
      # its (n, rank) buffers are the ones whose shards the tests check.
      "accumulate": Config(lambda: flora_optax.flora_accumulate(
          adafactor(), every_k_schedule=2, rank=RANK, seed=1, axes=AXES, sketch="projection"),
          steps=9, save_at=5),
      "momentum_chain": Config(lambda: optax.chain(
          optax.clip_by_global_norm(1.0),
          flora_optax.flora_momentum(RANK, 0.9, kappa=2, seed=2, axes=AXES),
          optax.scale(-1e-2)), steps=4),
      "microbatch": Config(lambda: optax.adam(1e-2), steps=3, microbatch=True),
  }
  if hasattr(flora_optax, "flora_adamw"):
    # eps=1e-3: the decompressed first moment of an entry whose gradient is tiny is sketch
    # noise of the size of its row, which a tiny sqrt(nu) turns into updates of up to
    # 3e4 x the learning rate here (eps=1e-8), amplifying float rounding as much.
    out["adamw"] = Config(lambda: flora_optax.flora_adamw(1e-2, RANK, eps=1e-3, kappa=2,
                                                          seed=4, axes=AXES), steps=4)
  return out


def init_params():
  rng = np.random.default_rng(0)
  return {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
          for k, s in SHAPES.items()}


def global_batch(step):
  """The whole batch of a micro-step; each process feeds only its own rows of it."""
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((GLOBAL_BATCH, SHAPES["w1"][0])).astype(np.float32)
  return x, np.sin(x).astype(np.float32)


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])                       # (b, 16)
  for layer in range(SHAPES["stack"][0]):
    w = params["stack"][layer]                                        # (64, 16)
    h = h + jnp.tanh(h @ w.T) @ w / 8
  return jnp.mean((h @ params["w2"] - y) ** 2)


def micro_grad(params, x, y, step, accumulator="compressed"):
  """Gradients of one step, averaged over micro-batches of the step's batch."""
  if accumulator == "compressed":
    accumulator = flora_optax.compressed_mean(RANK, cycle=step, seed=3, axes=AXES)
  else:
    accumulator = optax.microbatching.AccumulationType.MEAN
  return optax.microbatching.microbatch(
      jax.grad(loss_fn), argnums=(1, 2), microbatch_size=MICROBATCH,
      accumulator=accumulator)(params, x, y)


class Layout:
  """How arrays are placed: unsharded (mesh None, the reference) or on a mesh."""

  def __init__(self, mesh: Mesh | None):
    self.mesh = mesh
    self._grad_steps = {}
    if mesh is not None:
      self.params = {k: NamedSharding(mesh, v) for k, v in SPECS.items()}
      self.batch = NamedSharding(mesh, BATCH_SPEC)
      self.replicated = NamedSharding(mesh, P())

  def grad_step(self, microbatch, params, accumulator="compressed"):
    """The compiled gradient step (one per kind, shared by the configs)."""
    key = (microbatch, accumulator)
    if key not in self._grad_steps:
      if microbatch:
        fn = lambda p, x, y, step: micro_grad(p, x, y, step, accumulator)  # noqa: E731
      else:
        fn = lambda p, x, y, step: jax.grad(loss_fn)(p, x, y)  # noqa: E731
      if self.mesh is None:
        jitted = jax.jit(fn)
      else:
        jitted = jax.jit(fn, in_shardings=(self.params, self.batch, self.batch,
                                           self.replicated), out_shardings=self.params)
      batch = self.put_batch(global_batch(0)[0])
      self._grad_steps[key] = jitted.lower(params, batch, batch, self.put_scalar(0)).compile()
    return self._grad_steps[key]

  def put_params(self, params):
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, params)
    # Every process holds the same host values and places only its own shards.
    return jax.tree.map(
        lambda v, s: jax.make_array_from_callback(v.shape, s, lambda idx: v[idx]),
        params, self.params)

  def put_batch(self, array):
    if self.mesh is None:
      return jnp.asarray(array)
    # Host-local data: this process passes only the rows its devices hold.
    lo, hi = local_rows(self.batch, array.shape)
    return jax.make_array_from_process_local_data(self.batch, array[lo:hi], array.shape)

  def put_scalar(self, value):
    if self.mesh is None:
      return jnp.asarray(value, jnp.int32)
    return jax.make_array_from_callback((), self.replicated,
                                        lambda _: np.asarray(value, np.int32))


def make_mesh():
  """One axis over every device of every process (Auto sharding, as the library's docs)."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def local_rows(sharding, shape):
  """The contiguous rows of a batch that this process's devices hold."""
  starts = sorted({idx[0].start or 0 for idx in
                   sharding.addressable_devices_indices_map(shape).values()})
  stops = sorted({shape[0] if idx[0].stop is None else idx[0].stop for idx in
                  sharding.addressable_devices_indices_map(shape).values()})
  assert all(a == b for a, b in zip(starts[1:], stops[:-1])), (starts, stops)
  return starts[0], stops[-1]


class Trainer:
  """The jitted steps of one config under one layout."""

  def __init__(self, config: Config, layout: Layout):
    self.config, self.layout = config, layout
    self.tx = tx = config.make()
    params_struct = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, init_params()))
    self.abstract_state = jax.eval_shape(tx.init, params_struct)

    def opt_step(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    if layout.mesh is None:
      self.state_shardings = None
      self.init = jax.jit(tx.init)
      self.opt_step = jax.jit(opt_step)
    else:
      p, s = layout.params, flora_optax.state_shardings(tx, params_struct, layout.params)
      self.state_shardings = s
      self.init = jax.jit(tx.init, out_shardings=s)
      self.opt_step = jax.jit(opt_step, in_shardings=(p, s, p), out_shardings=(p, s))

  def compile(self, params, opt_state):
    """Compiles both steps for these inputs, to be used from now on: their HLO texts."""
    self.grad_step = self.layout.grad_step(self.config.microbatch, params)
    # The optimizer step gets gradients sharded like the parameters.
    self.opt_step = self.opt_step.lower(params, opt_state, params).compile()
    return self.grad_step.as_text(), self.opt_step.as_text()

  def abstract_checkpoint(self):
    """The restore target: shapes, dtypes and (on a mesh) the shardings of this layout."""
    params = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, init_params()))
    tree = {"params": params, "opt_state": self.abstract_state}
    if self.layout.mesh is None:
      return tree
    shardings = {"params": self.layout.params, "opt_state": self.state_shardings}
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)

  def run(self, params, opt_state, start, stop, on_step=None):
    """Micro-steps start..stop-1: final params and state, and both after each step."""
    if not hasattr(self.opt_step, "as_text"):
      self.compile(params, opt_state)
    trajectory = []
    for i in range(start, stop):
      x, y = global_batch(i)
      grads = self.grad_step(params, self.layout.put_batch(x), self.layout.put_batch(y),
                             self.layout.put_scalar(i))
      params, opt_state = self.opt_step(grads, opt_state, params)
      trajectory.append((params, opt_state))
      if on_step is not None:
        on_step(i + 1, params, opt_state)
    return params, opt_state, trajectory


def flat(name, trajectory, start=0):
  """Host arrays keyed ``{run}/{micro-step}/{p|s}{leaf}``: params and state after each step.

  `trajectory` is what `Trainer.run` returned for micro-steps from `start` on; micro-steps
  are counted from the beginning of training, so a resumed run has the keys of the
  uninterrupted one.
  """
  out = {}
  for t, (params, opt_state) in enumerate(trajectory, start + 1):
    for kind, tree in (("p", params), ("s", opt_state)):
      for j, leaf in enumerate(jax.tree.leaves(tree)):
        out[f"{name}/{t}/{kind}{j}"] = np.asarray(leaf)
  return out


def save(path, params, opt_state):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), {"params": params, "opt_state": opt_state})


def restore(path, trainer):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), trainer.abstract_checkpoint())


# ------------------------------------------------------------- measurements on a mesh

FULL_SHAPE_RE = re.compile(r"(\w+)\[([\d,]*)\]")
# An HLO instruction whose op is an all-gather: "%name = <result type> all-gather(...".
ALLGATHER_RE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s*all-gather(?:-start)?\(")


def full_allgathers(hlo: str) -> list[str]:
  """The result shapes of the all-gathers in `hlo` that have the shape of a weight matrix."""
  wanted = {tuple(s) for s in SHAPES.values() if len(s) >= 2}
  hits = []
  for line in hlo.splitlines():
    match = ALLGATHER_RE.match(line)
    if match is None:
      continue
    for _, dims in FULL_SHAPE_RE.findall(match.group(1)):
      if dims and tuple(int(d) for d in dims.split(",")) in wanted:
        hits.append(f"all-gather -> {dims}")
  return hits


def path_name(path):
  return jax.tree_util.keystr(path, simple=True, separator="/")


def shard_report(opt_state):
  """Per state leaf: global shape, spec and the shards this process holds."""
  report = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    shards = leaf.addressable_shards
    report[path_name(path)] = {
        "shape": list(leaf.shape),
        "spec": str(leaf.sharding.spec),
        "expected_shard_shape": list(leaf.sharding.shard_shape(leaf.shape)),
        "shard_shapes": [list(s.data.shape) for s in shards],
        "shard_index": [[[sl.start, sl.stop] for sl in s.index] for s in shards],
        "global_bytes": int(leaf.nbytes),
        # Bytes of the distinct pieces this process holds (a replica on both of its
        # devices counted once).
        "process_bytes": int(sum({str(s.index): s.data.nbytes for s in shards}.values())),
        "device_bytes": int(sum(s.data.nbytes for s in shards)),
    }
  return report


def gather(tree, layout):
  """The global values of sharded arrays, as NumPy arrays on every process.

  One jitted identity that replicates the whole tree (what ``multihost_utils.
  process_allgather`` does, with one compilation per tree instead of one per leaf).
  """
  full = jax.jit(lambda t: t, out_shardings=layout.replicated)(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)


def run_train(args):
  """2 processes: every config sharded over all devices, plus checkpoints across processes."""
  pid = jax.process_index()
  mesh = make_mesh()
  layout = Layout(mesh)
  info = {"process_index": pid, "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "devices": jax.device_count(),
          "mesh_shape": dict(mesh.shape),
          "batch_rows": local_rows(layout.batch, (GLOBAL_BATCH,)),
          "has_check_processes_agree": hasattr(flora_optax, "check_processes_agree"),
          "configs": {}, "cpu_seconds": {}}
  results = {}
  t0 = [time.process_time()]

  def tick(label):
    now = time.process_time()
    info["cpu_seconds"][label] = round(now - t0[0], 3)
    t0[0] = now

  trainers = {}
  for name, config in configs().items():
    trainer = trainers[name] = Trainer(config, layout)
    params = layout.put_params(init_params())
    opt_state = trainer.init(params)
    if info["has_check_processes_agree"]:
      flora_optax.check_processes_agree(opt_state)  # the same options everywhere: passes
    tick(f"{name} init")
    grad_hlo, opt_hlo = trainer.compile(params, opt_state)
    tick(f"{name} compile")
    entry = info["configs"][name] = {
        "shards": shard_report(opt_state), "full_allgathers": full_allgathers(opt_hlo)}
    if config.microbatch:
      # The gradient step runs the model, and FSDP may gather weights for the forward
      # pass: compressed_mean must add no weight gather to optax's exact MEAN.
      mean_hlo = layout.grad_step(True, params, accumulator="mean").as_text()
      entry["grad_step_full_allgathers"] = {"compressed": full_allgathers(grad_hlo),
                                            "mean": full_allgathers(mean_hlo)}

    def on_step(step, params, opt_state, name=name, config=config):
      if step == config.save_at:
        # Mid-cycle: every process writes its own shards.
        save(os.path.join(args.out, "ckpt", "two_process"), params, opt_state)
        info["configs"][name]["saved_at"] = step

    tick(f"{name} report")
    _, opt_state, trajectory = trainer.run(params, opt_state, 0, config.steps, on_step)
    tick(f"{name} run")
    entry["final_shards"] = shard_report(opt_state)
    results.update(flat(name, gather(trajectory, layout)))
    tick(f"{name} gather")

  # 1 process -> 2 processes: the reference's checkpoint (saved by one process on one
  # device) restored onto the 4 devices of the 2 processes, and run to the end.
  trainer = trainers["accumulate"]
  restored = restore(os.path.join(args.out, "ckpt", "one_process"), trainer)
  info["restored_from_one_process"] = shard_report(restored["opt_state"])
  _, _, trajectory = trainer.run(restored["params"], restored["opt_state"],
                                 trainer.config.save_at, trainer.config.steps)
  results.update(flat("accumulate_from_one_process", gather(trajectory, layout),
                      trainer.config.save_at))
  tick("restore from one process")

  # Control for the all-gather detector: replicating a sharded weight must be seen.
  gather_w = jax.jit(lambda w: w * 2, in_shardings=layout.params["w1"],
                     out_shardings=layout.replicated)
  info["control_allgathers"] = full_allgathers(
      gather_w.lower(jax.ShapeDtypeStruct(SHAPES["w1"], jnp.float32)).compile().as_text())
  write(args.out, pid, results, info)


def run_reference(args):
  """1 process, 1 device: every config unsharded, and the checkpoint for 1 -> 2 processes."""
  layout = Layout(None)
  results, counters = {}, {}
  for name, config in configs().items():
    trainer = Trainer(config, layout)
    params = layout.put_params(init_params())

    def on_step(step, params, opt_state, config=config):
      if step == config.save_at:  # mid-cycle, as the two processes do
        save(os.path.join(args.out, "ckpt", "one_process"), params, opt_state)
        counters["saved"] = accumulation_counters(opt_state)

    _, opt_state, trajectory = trainer.run(params, trainer.init(params), 0, config.steps,
                                           on_step)
    if config.save_at is not None:
      counters["final"] = accumulation_counters(opt_state)
    results.update(flat(name, trajectory))
  write(args.out, "reference", results, counters)


def accumulation_counters(state):
  return {"mini_step": int(state.mini_step), "gradient_step": int(state.gradient_step)}


def run_restore(args):
  """1 process, N devices: the 2-process checkpoint restored here and run to the end."""
  mesh = make_mesh()
  layout = Layout(mesh)
  config = configs()["accumulate"]
  trainer = Trainer(config, layout)
  restored = restore(os.path.join(args.out, "ckpt", "two_process"), trainer)
  trainer.compile(restored["params"], restored["opt_state"])
  info = {"devices": jax.device_count(), "restored": shard_report(restored["opt_state"]),
          "counters": accumulation_counters(restored["opt_state"])}
  _, _, trajectory = trainer.run(restored["params"], restored["opt_state"],
                                 config.save_at, config.steps)
  write(args.out, f"restore{args.devices}",
        flat(f"accumulate_restored_on_{args.devices}", trajectory, config.save_at), info)


MISMATCH = {"seed": {"seed": 1}, "rank": {"rank": 2 * RANK}, "kappa": {"kappa": 3}}


def run_agree(args):
  """Process 1 is built with another option; the check must raise on every process."""
  options = MISMATCH[args.mismatch] if jax.process_index() == 1 else {}
  mesh = make_mesh()
  layout = Layout(mesh)
  config = Config(lambda: adafactor(accumulate_every=2, **options), steps=0)
  trainer = Trainer(config, layout)
  opt_state = trainer.init(layout.put_params(init_params()))
  flora_optax.check_processes_agree(opt_state)
  print("processes agree", flush=True)


def write(out, tag, results, info):
  np.savez(os.path.join(out, f"results_{tag}.npz"), **results)
  with open(os.path.join(out, f"info_{tag}.json"), "w", encoding="utf-8") as f:
    json.dump(info, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("reference", "train", "restore", "agree"))
  parser.add_argument("--port", type=int)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=2, help="CPU devices of this process")
  parser.add_argument("--mismatch", choices=tuple(MISMATCH))
  parser.add_argument("--out", default=".")
  args = parser.parse_args()

  jax.config.update("jax_num_cpu_devices", args.devices)
  # Compiling is most of the cost; XLA's optimisations change nothing that is measured.
  jax.config.update("jax_disable_most_optimizations", True)
  if args.mode in ("train", "agree"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id,
                               initialization_timeout=60)
  {"reference": run_reference, "train": run_train, "restore": run_restore,
   "agree": run_agree}[args.mode](args)
  print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  sys.exit(main())
