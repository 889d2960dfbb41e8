"""What every benchmark shares: where outputs go, the machine, tables, timing, GPT-2 trees.

Run the benchmarks as modules from the repository root, ``python -m benchmarks.<name>``, so
that they import this module and the Shakespeare model of ``examples/`` as packages.

Outputs. A full run writes its summary (``<name>.json``: every number, with the command and
the machine; ``<name>.md``: the tables) into ``benchmarks/results/<name>/``, which is
committed, and its figures into ``docs/img/benchmarks/``, the one copy the docs show. Raw
per-run files go to ``benchmarks/runs/<name>/``, which git ignores. ``--quick`` (a smoke test)
writes everything into ``benchmarks/results/<name>-quick/`` (ignored), and ``--out DIR`` into
``DIR``, so neither overwrites what is committed.

Timing. :func:`time_interleaved` is the one way to time: the candidates of a comparison run
in interleaved rounds (one call of each per round, the order rotated every round), so a slow
moment of a shared machine hits all of them alike. Every number is a **median** over rounds,
with the **interquartile range** (25th-75th percentile) as its spread; a ratio is the median
of the per-round ratios, each between two calls made side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
RAW_ROOT = REPO_ROOT / "benchmarks" / "runs"
FIGURES_DIR = REPO_ROOT / "docs" / "img" / "benchmarks"

# ------------------------------------------------------------------------------ command line


def arg_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
  """A parser with the options every benchmark has: ``--quick`` and ``--out``."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--out", type=Path, default=None,
                      help="write every output here instead of the default places")
  return parser


def command_line() -> str:
  """The command that produced a result, as run from the repository root."""
  main = sys.modules["__main__"]
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    head = ["python", "-m", spec.name]
  else:
    script = Path(sys.argv[0]).resolve()
    try:
      script = script.relative_to(REPO_ROOT)
    except ValueError:
      pass
    head = ["python", str(script)]
  return " ".join(head + sys.argv[1:])


# ------------------------------------------------------------------------------ output places


def results_dir(name: str, quick: bool, out: Path | None = None) -> Path:
  """Summary tables: ``--out``, else ``benchmarks/results/<name>[-quick]/``."""
  path = Path(out) if out else RESULTS_ROOT / (f"{name}-quick" if quick else name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def figures_dir(name: str, quick: bool, out: Path | None = None) -> Path:
  """Figures: ``docs/img/benchmarks/`` for a full run, beside the tables otherwise."""
  if quick or out:
    return results_dir(name, quick, out)
  FIGURES_DIR.mkdir(parents=True, exist_ok=True)
  return FIGURES_DIR


def raw_dir(name: str, quick: bool, out: Path | None = None) -> Path:
  """Raw per-run files (not committed): ``benchmarks/runs/<name>[-quick]/`` or ``<out>/runs``."""
  path = Path(out) / "runs" if out else RAW_ROOT / (f"{name}-quick" if quick else name)
  path.mkdir(parents=True, exist_ok=True)
  return path


# ------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
  """Platform, CPU, device and package versions, recorded with every result."""
  import optax

  import flora_optax
  try:
    import flax
    flax_version = flax.__version__
  except ImportError:  # the GPU machine may have only the runtime dependencies
    flax_version = None
  cpu = platform.processor() or platform.machine()
  try:  # the model name is more telling than "x86_64" where /proc/cpuinfo exists
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return {
      "platform": platform.platform(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "device": getattr(device, "device_kind", str(device)),
      "jax_backend": jax.default_backend(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax_version,
      "flora_optax": flora_optax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def machine_line(info: dict[str, Any]) -> str:
  device = "" if info["jax_backend"] == "cpu" else f"; {info['device']}"
  load = (f" (load average {', '.join(f'{x:.1f}' for x in info['load_avg'])})"
          if info.get("load_avg") else "")
  return (f"{info['cpu']}, {info['cpu_count']} cores{load}, {info['platform']}{device}; "
          f"python {info['python']}, jax {info['jax']} ({info['jax_backend']}), "
          f"optax {info['optax']}, flax {info['flax']}, flora_optax {info['flora_optax']}")


# ------------------------------------------------------------------------------ writing


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_json(path: Path, payload: Any) -> None:
  path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_report(out: Path, name: str, payload: dict[str, Any], tables: str,
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``<name>.json`` (``payload`` plus the command and the machine) and ``<name>.md``
  (command, machine, then ``tables``). Returns the machine info used."""
  info = info or machine_info()
  command = command_line()
  write_json(out / f"{name}.json", {"command": command, "machine": info, **payload})
  (out / f"{name}.md").write_text(
      f"Command: `{command}`\n\nMachine: {machine_line(info)}\n\n{tables}\n")
  return info


# ------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Timing:
  """The times of one candidate, one per round (seconds per unit of work)."""

  seconds: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def summary(self, baseline: Timing | None = None) -> dict[str, float]:
    """Median and interquartile range in ms; with a ``baseline`` timed in the same rounds,
    the median and interquartile range of the per-round ratios to it."""
    ms = 1e3 * np.asarray(self.seconds)
    out = {"ms": float(np.median(ms)), "ms_p25": float(np.percentile(ms, 25)),
           "ms_p75": float(np.percentile(ms, 75)), "rounds": len(self.seconds)}
    if baseline is not None and baseline.seconds:
      ratios = [a / b for a, b in zip(self.seconds, baseline.seconds)]
      out.update(ratio=float(np.median(ratios)), ratio_p25=float(np.percentile(ratios, 25)),
                 ratio_p75=float(np.percentile(ratios, 75)))
    return out


def time_interleaved(candidates: Mapping[str, Callable[[], Any]], rounds: int, *,
                     warmup: int = 1, units: Mapping[str, int] | None = None,
                     deadline: float | None = None, min_rounds: int = 3) -> dict[str, Timing]:
  """Times each zero-argument callable, the candidates interleaved.

  Every candidate is first called ``warmup`` times. Then each round calls every candidate once,
  the order rotated by one each round, and waits for the result with
  ``jax.block_until_ready``. A candidate's time in a round is divided by ``units[name]`` (for
  instance the micro-steps one call makes). After ``min_rounds`` rounds, no round starts past
  ``deadline`` (a ``time.perf_counter()`` value).
  """
  names = list(candidates)
  units = units or {}
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(candidates[name]())
  seconds: dict[str, list[float]] = {name: [] for name in names}
  for i in range(rounds):
    if deadline is not None and i >= min_rounds and time.perf_counter() > deadline:
      break
    for name in names[i % len(names):] + names[:i % len(names)]:
      start = time.perf_counter()
      jax.block_until_ready(candidates[name]())
      seconds[name].append((time.perf_counter() - start) / units.get(name, 1))
  return {name: Timing(seconds[name]) for name in names}


# ------------------------------------------------------------------------------ GPT-2 trees


@dataclasses.dataclass(frozen=True)
class GPT2Size:
  layers: int
  width: int
  heads: int
  vocab: int = 50257
  context: int = 1024


GPT2 = {
    "small": GPT2Size(layers=12, width=768, heads=12),
    "medium": GPT2Size(layers=24, width=1024, heads=16),
    "xl": GPT2Size(layers=48, width=1600, heads=25),
    # The --quick (CI smoke) tree: GPT-2 small's widths with 2 of its 12 blocks and a
    # 4096-token vocabulary (the full one's 38.6 M-entry embedding would dominate it).
    "small-2": GPT2Size(layers=2, width=768, heads=12, vocab=4096),
}


def gpt2_shapes(size: GPT2Size, dtype=jnp.float32, embeddings: bool = True) -> dict[str, Any]:
  """GPT-2's parameter tree as ``jax.ShapeDtypeStruct``s (nothing allocated).

  Hugging Face layout: blocks ``h_00``, ``h_01``, ...; Conv1D kernels ``(in, out)``; the output
  layer tied to the token embedding ``wte``. ``embeddings=False`` leaves out ``wte`` and ``wpe``.
  """
  d = size.width

  def leaf(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  def norm():
    return {"scale": leaf(d), "bias": leaf(d)}

  tree: dict[str, Any] = {}
  if embeddings:
    tree |= {"wte": leaf(size.vocab, d), "wpe": leaf(size.context, d)}
  for i in range(size.layers):
    tree[f"h_{i:02d}"] = {
        "ln_1": norm(),
        "attn": {"c_attn": {"kernel": leaf(d, 3 * d), "bias": leaf(3 * d)},
                 "c_proj": {"kernel": leaf(d, d), "bias": leaf(d)}},
        "ln_2": norm(),
        "mlp": {"c_fc": {"kernel": leaf(d, 4 * d), "bias": leaf(4 * d)},
                "c_proj": {"kernel": leaf(4 * d, d), "bias": leaf(d)}},
    }
  tree["ln_f"] = norm()
  return tree


def random_tree(shapes: Any, seed: int, scale: float = 0.02, like_params: bool = True) -> Any:
  """Random arrays of the shapes and dtypes of ``shapes``, on the default device, one small
  jitted draw per leaf (no full-tree temporaries).

  ``like_params``: matrices ``N(0, scale²)``, layer-norm scales 1, other vectors 0. Otherwise
  (gradients) every leaf is ``N(0, scale²)``.
  """
  @functools.partial(jax.jit, static_argnums=(1, 2, 3))
  def draw(key, shape, dtype, kind):
    if kind == "ones":
      return jnp.ones(shape, dtype)
    if kind == "zeros":
      return jnp.zeros(shape, dtype)
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  key = jax.random.key(seed)
  leaves = []
  for i, (path, leaf) in enumerate(flat):
    kind = "normal"
    if like_params and len(leaf.shape) == 1:
      kind = "ones" if "scale" in jax.tree_util.keystr(path[-1:]) else "zeros"
    leaves.append(draw(jax.random.fold_in(key, i), tuple(leaf.shape), jnp.dtype(leaf.dtype),
                       kind))
  return jax.tree.unflatten(treedef, leaves)
