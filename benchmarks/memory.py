"""Exact optimizer-state bytes of Flora, naive Adafactor momentum/accumulation, GaLore and Muon.

Nothing is allocated: parameter trees are ``jax.ShapeDtypeStruct``s and every state is sized
with ``flora_optax.state_bytes(jax.eval_shape(tx.init, params))``.

    python -m benchmarks.memory            # GPT-2 small/medium/XL and the demo model
    python -m benchmarks.memory --quick    # GPT-2 small and the demo model only

Writes memory.json and memory.md into ``benchmarks/results/memory/`` and memory.png into
``docs/img/benchmarks/`` (``--quick``: all into ``benchmarks/results/memory-quick/``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import matplotlib
import optax

import flora_optax
from benchmarks import _harness
from examples import shakespeare_lm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ACCUMULATE_EVERY = shakespeare_lm.ACCUMULATE_EVERY
LEARNING_RATE = 1e-2  # irrelevant to memory; every optimizer needs one
GPT2_MODELS = ("small", "medium", "xl")


def is_token_embedding(path) -> bool:
  name = jax.tree_util.keystr(tuple(path))
  return "wte" in name or "embedding" in name


def flora_mask_without_embedding(params):
  """Flora mask: the token embedding stays uncompressed, the default rule decides the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: False if is_token_embedding(path) else None, params)


def galore_dims_without_embedding(params):
  """GaLore dimension numbers: project every 2-D leaf except the token embedding."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: optax.contrib.GaLoreDimensionNumbers()
      if p.ndim == 2 and not is_token_embedding(path) else None, params)


def muon_dims_without_embedding(params):
  """Muon dimension numbers of Jordan's recipe: every 2-D leaf except the token embedding,
  which goes to the Adam fallback with the vectors."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: optax.contrib.MuonDimensionNumbers()
      if p.ndim == 2 and not is_token_embedding(path) else None, params)


def optimizers(rank: int, compress_embedding: bool,
               factor: dict) -> dict[str, optax.GradientTransformation]:
  """The rank-dependent optimizers, with the token embedding compressed or not."""
  flora_mask = None if compress_embedding else flora_mask_without_embedding
  galore_dims = None if compress_embedding else galore_dims_without_embedding
  return {
      "flora momentum": flora_optax.flora_adafactor(
          LEARNING_RATE, rank, momentum=0.9, mask=flora_mask, **factor),
      "flora accumulation": flora_optax.flora_accumulate(
          optax.adafactor(LEARNING_RATE, **factor), ACCUMULATE_EVERY, rank, mask=flora_mask),
      "galore (adam)": optax.contrib.galore(
          LEARNING_RATE, rank=rank, weight_dimension_numbers=galore_dims),
      "flora muon": flora_optax.flora_muon(LEARNING_RATE, rank, mask=flora_mask),
  }


BASELINES = {
    "adafactor (no momentum)": lambda factor: optax.adafactor(LEARNING_RATE, **factor),
    "naive momentum": lambda factor: optax.adafactor(LEARNING_RATE, momentum=0.9, **factor),
    "naive accumulation": lambda factor: optax.MultiSteps(
        optax.adafactor(LEARNING_RATE, **factor), ACCUMULATE_EVERY),
    "optax.contrib.muon": lambda factor: optax.contrib.muon(LEARNING_RATE),
}


def muon_rows(name: str, params: Any, rank: int) -> list[dict[str, Any]]:
  """``flora_muon`` against ``optax.contrib.muon`` at one rank, for the three places the token
  embedding can be: a Muon leaf with its momentum compressed, a Muon leaf with a full momentum
  (``mask``), or in the Adam fallback (both optimizers then keep Adam's two full buffers)."""
  full_muon = state_size(optax.contrib.muon(LEARNING_RATE), params)
  adam_embedding = muon_dims_without_embedding
  routes = {
      "muon, compressed": (dict(), full_muon),
      "muon, full momentum": (dict(mask=flora_mask_without_embedding), full_muon),
      "adam fallback": (dict(muon_weight_dimension_numbers=adam_embedding),
                        state_size(optax.contrib.muon(
                            LEARNING_RATE, muon_weight_dimension_numbers=adam_embedding),
                            params)),
  }
  rows = []
  for embedding, (options, muon_bytes) in routes.items():
    state = state_size(flora_optax.flora_muon(LEARNING_RATE, rank, **options), params)
    rows.append({"model": name, "rank": rank, "embedding": embedding, "state_bytes": state,
                 "muon_state_bytes": muon_bytes, "state_over_muon": state / muon_bytes,
                 "state_over_full_muon": state / full_muon})
  return rows


def muon_markdown(rows: list[dict[str, Any]]) -> str:
  header = ["model", "rank", "token embedding", "flora_muon state", "optax.contrib.muon state "
            "(same routing)", "ratio", "ratio to muon with the embedding in Muon"]
  return _harness.markdown_table(header, [
      [r["model"], r["rank"], r["embedding"], fmt_bytes(r["state_bytes"]),
       fmt_bytes(r["muon_state_bytes"]), f"{r['state_over_muon']:.3f}",
       f"{r['state_over_full_muon']:.3f}"] for r in rows])


def state_size(tx: optax.GradientTransformation, params: Any) -> int:
  return flora_optax.state_bytes(jax.eval_shape(tx.init, params))


def measure_model(name: str, params: Any, ranks: list[int],
                  factor: dict) -> list[dict[str, Any]]:
  """One row per (optimizer, rank, embedding compressed?) with exact state bytes.

  ``factor`` holds Adafactor's ``min_dim_size_to_factor`` where the model needs its own.
  """
  param_bytes = flora_optax.state_bytes(params)
  baseline_bytes = {label: state_size(make(factor), params)
                    for label, make in BASELINES.items()}
  naive_momentum = baseline_bytes["naive momentum"]
  no_momentum = baseline_bytes["adafactor (no momentum)"]

  def row(optimizer, rank, compress_embedding, state):
    return {
        "model": name, "optimizer": optimizer, "rank": rank,
        "embedding_compressed": compress_embedding, "param_bytes": param_bytes,
        "state_bytes": state, "state_over_params": state / param_bytes,
        "state_over_naive_momentum": state / naive_momentum,
        # The extra buffer on top of plain Adafactor (the momentum or the accumulator).
        "extra_over_params": (state - no_momentum) / param_bytes,
    }

  rows = [row(label, None, None, state) for label, state in baseline_bytes.items()]
  for rank in ranks:
    for compress_embedding in (True, False):
      for label, tx in optimizers(rank, compress_embedding, factor).items():
        rows.append(row(label, rank, compress_embedding, state_size(tx, params)))
  return rows


def models(quick: bool) -> dict[str, tuple[Any, list[int], dict]]:
  """Parameter trees, the ranks to try on each (the demo model is 64 wide: d/8..d/2) and
  Adafactor's factoring threshold (the demo's own, see shakespeare_lm.MIN_DIM_TO_FACTOR)."""
  config = shakespeare_lm.Config()
  _, _, vocab_size = shakespeare_lm.load_shakespeare()
  chosen = GPT2_MODELS[:1] if quick else GPT2_MODELS
  trees = {f"gpt2-{name}": (_harness.gpt2_shapes(_harness.GPT2[name]), [16, 64, 256], {})
           for name in chosen}
  d = config.d_model
  trees["shakespeare demo"] = (shakespeare_lm.param_shapes(config, vocab_size),
                               [d // 8, d // 4, d // 2],
                               {"min_dim_size_to_factor": shakespeare_lm.MIN_DIM_TO_FACTOR})
  return trees


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.2f} TiB"


def markdown(rows: list[dict[str, Any]]) -> str:
  header = ["model", "optimizer", "rank", "embedding", "state", "state / params",
            "state / naive momentum", "extra buffer / params"]
  table = []
  for r in rows:
    embedding = "-" if r["embedding_compressed"] is None else (
        "compressed" if r["embedding_compressed"] else "full")
    table.append([r["model"], r["optimizer"], r["rank"] or "-", embedding,
                  fmt_bytes(r["state_bytes"]), f"{r['state_over_params']:.3f}",
                  f"{r['state_over_naive_momentum']:.3f}", f"{r['extra_over_params']:.3f}"])
  return _harness.markdown_table(header, table)


def plot(rows: list[dict[str, Any]], path) -> None:
  names = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    model_rows = [r for r in rows if r["model"] == name]
    for r in model_rows:
      if r["rank"] is None:
        ax.axhline(r["state_over_params"], ls=":", color="gray")
        ax.annotate(r["optimizer"], (0.02, r["state_over_params"]),
                    xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    for label, marker in (("flora momentum", "o"), ("flora accumulation", "s"),
                          ("galore (adam)", "^"), ("flora muon", "D")):
      for compressed, style in ((True, "-"), (False, "--")):
        points = [(r["rank"], r["state_over_params"]) for r in model_rows
                  if r["optimizer"] == label and r["embedding_compressed"] == compressed]
        ranks, ratios = zip(*points)
        ax.plot(ranks, ratios, style, marker=marker, label=f"{label}, emb. "
                f"{'compressed' if compressed else 'full'}")
    ax.set_xscale("log", base=2)
    ax.set_title(name)
    ax.set_xlabel("rank")
    ax.set_ylabel("optimizer state / params (fp32)")
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  args = _harness.arg_parser(__doc__, "GPT-2 small and the demo only").parse_args()
  start = time.perf_counter()
  rows, muon = [], []
  for name, (params, ranks, factor) in models(args.quick).items():
    rows.extend(measure_model(name, params, ranks, factor))
    if name.startswith("gpt2"):  # flora_muon at rank d/4 against optax.contrib.muon
      muon.extend(muon_rows(name, params, _harness.GPT2[name[len("gpt2-"):]].width // 4))
  out = _harness.results_dir("memory", args.quick, args.out)
  table = (markdown(rows) + "\n\n## flora_muon against optax.contrib.muon, rank d/4\n\n"
           + muon_markdown(muon))
  _harness.write_report(out, "memory", {"rows": rows, "muon": muon}, table)
  plot(rows, _harness.figures_dir("memory", args.quick, args.out) / "memory.png")
  print(table)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
