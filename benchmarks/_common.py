"""Helpers shared by the benchmark scripts: where results go, what machine made them, tables."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"

# The Shakespeare model and data code lives with the demo; benchmarks import it from there.
sys.path.insert(0, str(REPO_ROOT / "examples"))


def results_dir(name: str, quick: bool) -> Path:
  """``benchmarks/results/<name>/`` (``<name>-quick`` for smoke runs, so they never overwrite
  the full results that docs/benchmarks.md cites)."""
  path = RESULTS_ROOT / (f"{name}-quick" if quick else name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def machine_info() -> dict[str, Any]:
  """Platform, CPU and package versions, recorded next to every result."""
  import flax
  import jax
  import optax

  import flora_optax
  cpu = platform.processor() or platform.machine()
  try:  # the model name is more telling than "x86_64" where /proc/cpuinfo exists
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
      "platform": platform.platform(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "optax": optax.__version__,
      "flax": flax.__version__,
      "flora_optax": flora_optax.__version__,
  }


def machine_line(info: dict[str, Any]) -> str:
  return (f"{info['cpu']}, {info['cpu_count']} cores, {info['platform']}; python "
          f"{info['python']}, jax {info['jax']} ({info['jax_backend']}), optax {info['optax']}, "
          f"flax {info['flax']}, flora_optax {info['flora_optax']}")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_json(path: Path, payload: Any) -> None:
  path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def command_line() -> str:
  """The command that produced a result, relative to the repository root."""
  script = Path(sys.argv[0]).resolve()
  try:
    script = script.relative_to(REPO_ROOT)
  except ValueError:
    pass
  return " ".join(["python", str(script), *sys.argv[1:]])
