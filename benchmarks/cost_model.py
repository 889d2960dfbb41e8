"""Flops and bytes of Flora's update step by XLA's cost model, beside what must move.

Every optimizer step ``tx.update`` + ``optax.apply_updates`` is jitted with the parameters and
the state donated, lowered on ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape``: nothing
large is allocated) and compiled for the CPU; ``compiled.cost_analysis()`` gives its flops and
bytes accessed. Beside each row:

* floor GB: the bytes that must move: read the gradients, the parameters and the state, write
  the parameters and the state, in their dtypes;
* floor GFLOP: the projection matmuls, ``2·n·m·r`` per matmul and compressed leaf (two-sided:
  ``2·N·M·(k + l)`` down, ``2·N·M·k`` up); momentum does one down and one up per step,
  accumulation one down per micro-step and one up per cycle; ``emit="residual"`` adds one of
  each.

XLA's cost model prices a ``conditional`` as the **most expensive of its branches**, a loop
fusion at the shapes of its fused instructions (a slice of a fused batch is priced at the
whole batch) and a ``while`` body once, whatever its trip count. The resample of Flora's momentum (every
``kappa`` steps) and the inner update of ``flora_accumulate`` (every ``k`` micro-steps) sit
in a ``lax.cond``, so the compiled step is priced as if it ran every time. Each row therefore
also gives the **ordinary step**: the compiled step with the conditional priced at the branch
that runs on ordinary steps (predicate false; from the per-instruction attribution below, and
checked against a compile with the step counter pinned to a constant, which XLA folds away).

The attribution section prices every top-level HLO instruction of a compiled step on its own
(XLA's own cost model on a one-instruction module; the parts add up to the total) and groups
them by what they do. Two small demonstrations show where the cost model and execution part:
a ``cond`` whose false branch is cheap, and a batch of projection draws sliced per leaf. Wall
times (full mode) are medians of interleaved rounds (``_harness.time_interleaved``).

    python -m benchmarks.cost_model           # GPT-2 small and medium, r 64 and 256, fp32/bf16
    python -m benchmarks.cost_model --quick   # 2 GPT-2-small blocks, r 256, fp32, few rows

The full run prices the ``flora_adafactor`` options (projections, two-sided, residual,
``kappa=None``) on GPT-2 small fp32 only (``--variants-everywhere``: on every tree, dtype and
rank) and times five steps on GPT-2 small (``--no-timing`` skips it); on two shared CPU cores
it takes about 20 minutes, ``--quick`` under a minute.

Writes cost_model.json and cost_model.md into ``benchmarks/results/cost_model/``
(``--quick``: ``benchmarks/results/cost_model-quick/``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax
from benchmarks import _harness
from flora_optax import _buffers, _sketches

LR = 1e-3
K_ACCUMULATE = 16
GB, GFLOP = 1e9, 1e9

# ------------------------------------------------------------------------------ compiling


def step_fn(tx: optax.GradientTransformation, pins: dict[str, int] | None = None) -> Callable:
  """``update`` + ``apply_updates``. `pins` replaces state fields of that name (a step counter)
  by a constant, so that XLA folds the conditional on it and compiles one path only."""
  def step(params, state, grads):
    if pins:
      state = jax.tree_util.tree_map_with_path(lambda path, x: _pin(path, x, pins), state)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _pin(path, x, pins):
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name in pins:
    return jnp.asarray(pins[last.name], x.dtype)
  return x


def compile_step(tx, params, pins=None):
  """(compiled, state shapes, seconds to lower and compile) for abstract `params`."""
  state = jax.eval_shape(tx.init, params)
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # donated buffers a pinned step does not reuse
    compiled = jax.jit(step_fn(tx, pins), donate_argnums=(0, 1)).lower(
        params, state, params).compile()
  return compiled, state, time.perf_counter() - start


def cost(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0]
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0))}


# ------------------------------------------------------------------------------ floors


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def io_floor_bytes(params, state) -> int:
  """Read gradients, parameters and state; write parameters and state."""
  return 2 * tree_bytes(params) + 2 * tree_bytes(state) + tree_bytes(params)


def compressed_nodes(state) -> list:
  return [x for x in jax.tree.leaves(state, is_leaf=_buffers.is_compressed)
          if _buffers.is_compressed(x)]


def projection_flops(node) -> tuple[float, float]:
  """Flops of one down (compress) and one up (decompress) matmul of a compressed leaf."""
  leaf, sketch, batch = node.leaf, node.sketch, math.prod(node.leaf.batch_shape)
  if isinstance(sketch, _sketches.TwoSided):
    k, l = sketch.sizes(leaf.n, leaf.m)
    return 2.0 * batch * leaf.n * leaf.m * (k + l), 2.0 * batch * leaf.n * leaf.m * k
  if isinstance(sketch, _sketches.OnlineFactors):  # G Q and Qᵀ G in; B A out
    k = sketch.sizes(leaf.n, leaf.m)
    return 4.0 * batch * leaf.n * leaf.m * k, 2.0 * batch * leaf.n * leaf.m * k
  per = 2.0 * batch * leaf.n * leaf.m * leaf.rank
  return per, per


def floor_flops(state, down: float, up: float) -> float:
  """`down` and `up` matmuls per step (fractions for amortized accumulation)."""
  total = 0.0
  for node in compressed_nodes(state):
    d, u = projection_flops(node)
    total += down * d + up * u
  return total


# ------------------------------------------------------------------------------ attribution

_HEAD = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INST = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")
_SKIP = ("parameter", "tuple", "get-tuple-element", "constant", "bitcast")


def _close(s: str, i: int) -> int:
  depth = 0
  for j in range(i, len(s)):
    depth += {"(": 1, ")": -1}.get(s[j], 0)
    if depth == 0 and s[j] == ")":
      return j + 1
  raise ValueError(f"unbalanced HLO line: {s[:200]}")


def _refs(s: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", s)


class HloCosts:
  """Per-instruction costs of a compiled module by XLA's own cost model.

  Each instruction of a computation is priced as a module of its own (its operands become
  parameters; the computations it calls come along), with
  ``jax._src.lib._jax.hlo_module_cost_analysis``: the same analysis as
  ``compiled.cost_analysis()``, so the parts add up to the total.
  """

  def __init__(self, text: str):
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    from jaxlib import _hlo
    self._parse_text, self._analyse = _hlo.hlo_module_from_text, _jax.hlo_module_cost_analysis
    self._client = xla_bridge.get_backend("cpu")
    self.comps: dict[str, dict] = {}
    self.order: list[str] = []
    self.entry = None
    current = None
    for line in text.splitlines():
      if current is None:
        m = _HEAD.match(line)
        if m and line.rstrip().endswith("{"):
          current = {"name": m.group(2), "lines": [line], "insts": []}
          self.entry = m.group(2) if m.group(1) else self.entry
        continue
      current["lines"].append(line)
      if line.startswith("}"):
        self.comps[current["name"]] = current
        self.order.append(current["name"])
        current = None
        continue
      m = _INST.match(line)
      if m:
        current["insts"].append(self._instruction(m, line))

  @staticmethod
  def _instruction(m, line) -> dict:
    rest = line[m.end():]
    if rest.startswith("("):
      end = _close(rest, 0)
      shape, rest = rest[:end], rest[end:].lstrip()
    else:
      shape, rest = rest.split(" ", 1)
    op = rest[:rest.index("(")]
    end = _close(rest, len(op))
    attrs = rest[end:]
    meta = re.search(r'op_name="([^"]*)"', attrs)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs) if op == "while" else None
    return {"name": m.group(2), "shape": shape, "op": op, "operands": rest[len(op):end],
            "attrs": attrs, "op_name": meta.group(1) if meta else "",
            "trips": int(trips.group(1)) if trips else 1}

  def called(self, inst) -> list[str]:
    return [r for r in _refs(inst["attrs"]) if r in self.comps]

  def reachable(self, names) -> set[str]:
    seen, stack = set(), list(names)
    while stack:
      name = stack.pop()
      if name in seen or name not in self.comps:
        continue
      seen.add(name)
      stack.extend(r for line in self.comps[name]["lines"][1:] for r in _refs(line)
                   if r in self.comps)
    return seen

  def inner(self, inst) -> tuple[str, set[str]]:
    """The op names (joined) and the opcodes of `inst` and of everything it calls."""
    names, ops = [inst["op_name"]], {inst["op"]}
    for comp in self.reachable(self.called(inst)):
      names += [i["op_name"] for i in self.comps[comp]["insts"]]
      ops |= {i["op"] for i in self.comps[comp]["insts"]}
    return " ".join(names), ops

  def price(self, comp: str, inst: dict) -> tuple[float, float]:
    shapes = {i["name"]: i["shape"] for i in self.comps[comp]["insts"]}
    operands = list(dict.fromkeys(r for r in _refs(inst["operands"]) if r in shapes))
    attrs = re.sub(r",?\s*control-predecessors=\{[^}]*\}", "", inst["attrs"])
    attrs = re.sub(r" stack_frame_id=\d+", "", attrs)
    body = [f"  %{o} = {shapes[o]} parameter({k})" for k, o in enumerate(operands)]
    body.append(f"  ROOT %{inst['name']} = {inst['shape']} {inst['op']}{inst['operands']}{attrs}")
    reach = self.reachable(self.called(inst))
    parts = ["HloModule one_instruction"]
    parts += [re.sub(r" stack_frame_id=\d+", "", "\n".join(self.comps[c]["lines"]))
              for c in self.order if c in reach]
    parts.append("ENTRY %priced {\n" + "\n".join(body) + "\n}")
    result = self._analyse(self._client, self._parse_text("\n\n".join(parts)))
    return float(result.get("flops", 0.0)), float(result.get("bytes accessed", 0.0))

  def rows(self, comp: str | None = None) -> list[dict]:
    comp = comp or self.entry
    out = []
    for inst in self.comps[comp]["insts"]:
      if inst["op"] in _SKIP:
        continue
      flops, nbytes = self.price(comp, inst)
      out.append({"inst": inst, "flops": flops, "bytes": nbytes,
                  "bucket": classify(inst, *self.inner(inst))})
    return out

  def branches(self, inst) -> list[str]:
    found = re.search(r"branch_computations=\{([^}]*)\}", inst["attrs"])
    if found:
      return _refs(found.group(1))
    found = re.search(r"true_computation=%([\w.\-]+), false_computation=%([\w.\-]+)",
                      inst["attrs"])
    return [found.group(2), found.group(1)] if found else []


DOWN_SPECS = ("...nm,...rm->...nr", "...rn,...nm->...rm", "...NM,...kM->...Nk",
              "...lN,...NM->...lM")
UP_SPECS = ("...nr,...rm->...nm", "...rn,...rm->...nm", "...Nk,...kM->...NM")
TRANSFER_SPECS = ("...nr,...sr->...ns", "...sr,...rm->...sm", "...sd,...rd->...sr",
                  "...sd,...td->...st", "...Nk,...kj->...Nj", "...kM,...jM->...kj",
                  "...lk,...kM->...lM")
RNG_MARKS = ("threefry", "_normal", "_uniform", "erf_inv", "random_bits", "leaf_key",
             "rademacher", "_dct_rows", "argsort", "sort", "cos", "random_wrap",
             "random_unwrap", "random_fold_in", "random_split", "draw")
LINALG_MARKS = ("jit(qr)", "householder", "solve", "/lu", "triangular")

BUCKETS = (
    "resample / finish cond (priced at its dearest branch)",
    "projection matmuls: down (compress)",
    "projection matmuls: up (decompress)",
    "residual and two-sided extra matmuls, QR, solves",
    "transfer matmuls and solves (resample)",
    "projection draws fused into each per-leaf slice of the stacked draw",
    "projection draws (RNG, orthogonal QR, DCT)",
    "casts (convert)",
    "copies and transposes",
    "optimizer arithmetic (elementwise, reductions, apply_updates)",
)


def classify(inst: dict, inner: str, ops: set[str]) -> str:
  """The bucket of an instruction, from its op names (JAX's ``op_name`` metadata, which
  names the einsum of a matmul) and the opcodes of what it fuses."""
  name, in_branch = inst["op_name"], "cond/branch_1_fun" in inst["op_name"]
  if inst["op"] == "conditional":
    return BUCKETS[0]
  drawing = any(m in name for m in RNG_MARKS) or (  # batched draws run under vmap; solves too
      "vmap(" in name and "solve" not in name and "/lu" not in name)
  specs = re.findall(r"([\w.]+,[\w.]+->[\w.]+)/dot_general", inner)
  if specs or "dot" in ops:
    if any(s in TRANSFER_SPECS for s in specs) or (in_branch and "solve" in inner):
      return BUCKETS[4]
    if specs and all(s in DOWN_SPECS for s in specs):
      return BUCKETS[1]
    if specs and all(s in UP_SPECS for s in specs):
      return BUCKETS[2]
    return BUCKETS[6] if drawing and not specs else BUCKETS[3]
  if (re.search(r"/slice$", name) and "fold_in" not in name
      and ops - {"slice", "bitcast", "parameter", "fusion", "reshape", "copy", "constant"}):
    return BUCKETS[5]  # x[j] of a stacked draw, with (part of) the draw fused into it
  if any(m in name for m in LINALG_MARKS) and not drawing:
    return BUCKETS[4] if in_branch and "solve" in name else BUCKETS[3]
  if drawing or inst["op"] == "while":
    return BUCKETS[6]
  if inst["op"] in ("copy", "transpose") or name.endswith("transpose"):
    return BUCKETS[8]
  if inst["op"] == "convert" or name.endswith("convert_element_type"):
    return BUCKETS[7]
  return BUCKETS[9]


def attribute(compiled) -> dict[str, Any]:
  """Buckets of the entry computation, the branches of its conditionals, and the step priced
  with each conditional at its false (ordinary) or true branch."""
  hlo = HloCosts(compiled.as_text())
  rows = hlo.rows()
  buckets = _sum_buckets(rows)
  total = {"flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows)}
  conds, if_false, if_true = [], dict(total), dict(total)
  for r in rows:
    if r["inst"]["op"] != "conditional":
      continue
    branches = [_sum_buckets(hlo.rows(b)) for b in hlo.branches(r["inst"])]
    totals = [{k: sum(v[k] for v in b.values()) for k in ("flops", "bytes")} for b in branches]
    for k in ("flops", "bytes"):
      if_false[k] += totals[0][k] - r[k]
      if_true[k] += totals[-1][k] - r[k]
    conds.append({"op_name": r["inst"]["op_name"], "priced": {k: r[k] for k in ("flops", "bytes")},
                  "branches": [{"total": t, "buckets": b} for t, b in zip(totals, branches)]})
  top = sorted(rows, key=lambda r: -(r["bytes"] / GB + r["flops"] / GFLOP / 20))[:12]
  return {"total": total, "buckets": buckets, "conditionals": conds, "if_false": if_false,
          "if_true": if_true,
          "top": [{"op": r["inst"]["op"], "op_name": r["inst"]["op_name"][-90:],
                   "shape": r["inst"]["shape"][:80], "flops": r["flops"], "bytes": r["bytes"],
                   "bucket": r["bucket"]} for r in top]}


def _sum_buckets(rows) -> dict[str, dict[str, float]]:
  """Per bucket: the cost model's price, and the price with each top-level loop multiplied by
  its known trip count (the cost model prices a ``while`` body once)."""
  out = collections.defaultdict(
      lambda: {"flops": 0.0, "bytes": 0.0, "flops_x_trips": 0.0, "bytes_x_trips": 0.0,
               "count": 0})
  for r in rows:
    trips = r["inst"]["trips"]
    out[r["bucket"]]["flops"] += r["flops"]
    out[r["bucket"]]["bytes"] += r["bytes"]
    out[r["bucket"]]["flops_x_trips"] += r["flops"] * trips
    out[r["bucket"]]["bytes_x_trips"] += r["bytes"] * trips
    out[r["bucket"]]["count"] += 1
  return {b: out[b] for b in BUCKETS if b in out}


# ------------------------------------------------------------------------------ the rows


@dataclasses.dataclass(frozen=True)
class Config:
  """One optimizer to price. ``down``/``up``: projection matmuls of its ordinary step;
  ``pin``: counters that select the ordinary path (to check the attribution by a compile)."""

  name: str
  make: Callable[[int], optax.GradientTransformation]
  group: str
  down: float = 0.0
  up: float = 0.0
  ranked: bool = True
  pin: dict | None = None
  variant: bool = False  # an option of flora_adafactor: GPT-2 small fp32 only by default


def unfolded_adafactor(learning_rate, rank, **options) -> optax.GradientTransformation:
  """``flora_adafactor``'s default chain written out from its public pieces: it forms
  Adafactor's scaled update ``diag(a)·G·diag(b)`` before compressing it, as ``flora_adafactor``
  did before the preconditioner was folded into the projection (same updates)."""
  return optax.chain(optax.scale_by_factored_rms(), flora_optax.flora_momentum(rank, **options),
                     optax.clip_by_block_rms(1.0),
                     optax.scale_by_learning_rate(learning_rate, flip_sign=False),
                     optax.scale_by_param_block_rms(), optax.scale(-1))


def configs() -> list[Config]:
  fa = flora_optax.flora_adafactor
  acc = lambda r: flora_optax.flora_accumulate(optax.adafactor(LR), K_ACCUMULATE, r)  # noqa: E731
  return [
      Config("optax.adafactor", lambda r: optax.adafactor(LR), "adafactor", ranked=False),
      Config("optax.adafactor momentum=0.9 (naive)",
             lambda r: optax.adafactor(LR, momentum=0.9), "adafactor", ranked=False),
      Config("flora_adafactor", lambda r: fa(LR, r), "adafactor", 1, 1,
             pin={"cycle_step": 1}),
      Config("flora_adafactor kappa=None", lambda r: fa(LR, r, kappa=None), "adafactor", 1, 1,
             variant=True),
      Config("flora_adafactor, unfolded chain", lambda r: unfolded_adafactor(LR, r),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor projection=orthogonal",
             lambda r: fa(LR, r, projection="orthogonal"), "adafactor", 1, 1, variant=True),
      Config("flora_adafactor projection=dct", lambda r: fa(LR, r, projection="dct"),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor projection=rademacher",
             lambda r: fa(LR, r, projection="rademacher"), "adafactor", 1, 1, variant=True),
      Config("flora_adafactor prng_impl=rbg", lambda r: fa(LR, r, prng_impl="rbg"),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor sketch=two_sided", lambda r: fa(LR, r, sketch="two_sided"),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor dtype=int8", lambda r: fa(LR, r, dtype="int8"), "adafactor", 1, 1,
             pin={"cycle_step": 1}, variant=True),
      # The residual's down-projection is the fold's own, and it shares the up-projection.
      Config("flora_adafactor emit=residual", lambda r: fa(LR, r, emit="residual"),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor sketch=two_sided emit=residual",
             lambda r: fa(LR, r, sketch="two_sided", emit="residual"), "adafactor", 1, 1,
             variant=True),
      Config("flora_adafactor sketch=factors", lambda r: fa(LR, r, sketch="factors"),
             "adafactor", 1, 1, variant=True),
      Config("flora_adafactor sketch=factors emit=residual",
             lambda r: fa(LR, r, sketch="factors", emit="residual"), "adafactor", 1, 2,
             variant=True),
      Config("optax.ema(0.9)", lambda r: optax.ema(0.9), "momentum alone", ranked=False),
      Config("flora_optax.int8_ema(0.9)", lambda r: flora_optax.int8_ema(0.9),
             "momentum alone", ranked=False),
      Config("flora_momentum kappa=None", lambda r: flora_optax.flora_momentum(r, kappa=None),
             "momentum alone", 1, 1),
      Config("optax.adamw", lambda r: optax.adamw(LR), "adamw", ranked=False),
      Config("flora_adamw", lambda r: flora_optax.flora_adamw(LR, r), "adamw", 1, 1),
      Config("flora_adamw sketch=two_sided",
             lambda r: flora_optax.flora_adamw(LR, r, sketch="two_sided"), "adamw", 1, 1,
             variant=True),
      Config("flora_adamw sketch=factors",
             lambda r: flora_optax.flora_adamw(LR, r, sketch="factors"), "adamw", 1, 1,
             variant=True),
      # Muon's update is dominated by Newton–Schulz (5 steps, each ~4·n·m·min(n, m) flops):
      # the same in both; flora_muon adds the projection of its momentum.
      Config("optax.contrib.muon", lambda r: optax.contrib.muon(LR), "muon", ranked=False),
      Config("flora_muon", lambda r: flora_optax.flora_muon(LR, r), "muon", 1, 1,
             pin={"cycle_step": 1}),
      Config(f"optax.MultiSteps(adafactor, {K_ACCUMULATE})",
             lambda r: optax.MultiSteps(optax.adafactor(LR), K_ACCUMULATE), "accumulation",
             ranked=False),
      Config(f"flora_accumulate(adafactor, {K_ACCUMULATE})", acc, "accumulation", 1, 0,
             pin={"mini_step": 0}),
      Config(f"flora_accumulate(adafactor, {K_ACCUMULATE}) sketch=two_sided",
             lambda r: flora_optax.flora_accumulate(optax.adafactor(LR), K_ACCUMULATE, r,
                                                    sketch="two_sided"),
             "accumulation", 1, 0, pin={"mini_step": 0}, variant=True),
      Config(f"flora_accumulate(adafactor, {K_ACCUMULATE}) sketch=factors",
             lambda r: flora_optax.flora_accumulate(optax.adafactor(LR), K_ACCUMULATE, r,
                                                    sketch="factors"),
             "accumulation", 1, 0, pin={"mini_step": 0}, variant=True),
  ]


QUICK = ("optax.adafactor", "optax.adafactor momentum=0.9 (naive)", "flora_adafactor",
         "flora_adafactor, unfolded chain",
         "optax.ema(0.9)", "flora_momentum kappa=None", "optax.contrib.muon", "flora_muon")


def measure(config: Config, size: str, dtype, rank: int, check_pin: bool) -> dict[str, Any]:
  params = _harness.gpt2_shapes(_harness.GPT2[size], dtype)
  tx = config.make(rank)
  compiled, state, seconds = compile_step(tx, params)
  row = {"tree": f"GPT-2 {size}", "dtype": jnp.dtype(dtype).name,
         "rank": rank if config.ranked else None, "optimizer": config.name,
         "group": config.group, "compile_s": seconds, **cost(compiled),
         "floor_bytes": float(io_floor_bytes(params, state)),
         "floor_flops": floor_flops(state, config.down, config.up),
         "state_bytes": float(tree_bytes(state)), "param_bytes": float(tree_bytes(params))}
  if compressed_nodes(state):  # Flora: price each conditional at its branches
    attribution = attribute(compiled)
  else:  # a baseline: no conditional on a step counter; the compiled step is what runs
    total = cost(compiled)
    attribution = {"total": total, "buckets": {}, "conditionals": [], "if_false": total,
                   "if_true": total, "top": []}
  row["attribution"] = attribution
  row["ordinary"] = attribution["if_false"]
  if config.name.startswith("flora_accumulate"):
    finish = floor_flops(state, 1, 1)
    row["finish"] = attribution["if_true"]
    row["floor_flops_finish"] = finish
    row["amortized"] = {k: ((K_ACCUMULATE - 1) * attribution["if_false"][k]
                            + attribution["if_true"][k]) / K_ACCUMULATE
                        for k in ("flops", "bytes")}
    row["floor_flops_amortized"] = floor_flops(state, 1, 1 / K_ACCUMULATE)
  if check_pin and config.pin:
    pinned, _, _ = compile_step(tx, params, config.pin)
    row["pinned"] = {**cost(pinned), "pins": config.pin}
  del compiled
  return row


# ------------------------------------------------------------------------------ demonstrations


def rng_lowering_demo(shape=(256, 768)) -> dict[str, Any]:
  """How JAX lowers one Gaussian draw (the projection of a 768-wide leaf at r = 256) for each
  platform, without compiling for it: on CPU the threefry hash is a rolled ``while`` loop
  (which the cost model prices for one trip), on CUDA and TPU it is unrolled into elementwise
  ops that fuse with the Gaussian transform."""
  key = jax.random.key_data(jax.random.key(0))
  draw = jax.jit(lambda k: jax.random.normal(jax.random.wrap_key_data(k), shape, jnp.float32))
  out = {}
  for platform in ("cpu", "cuda", "tpu"):
    text = draw.trace(key).lower(lowering_platforms=(platform,)).as_text()
    out[platform] = {"while_loops": text.count("stablehlo.while"),
                     "stablehlo_ops": text.count(" = stablehlo.")}
  compiled = draw.lower(key).compile()
  out["cpu_cost_model"] = cost(compiled)
  out["bytes_of_the_draw"] = 4 * math.prod(shape)
  return out


def cond_demo(rounds: int) -> dict[str, Any]:
  """A cond with a dear true branch (two 1024³ matmuls) and a cheap false one (x·2)."""
  def f(pred, x):
    return jax.lax.cond(pred, lambda x: (x @ x.T) @ x, lambda x: x * 2.0, x)
  x = jnp.ones((1024, 1024), jnp.float32) / 1024
  compiled = jax.jit(f).lower(True, x).compile()
  parts = {name: cost(jax.jit(g).lower(x).compile()) for name, g in
           (("true branch alone", lambda x: (x @ x.T) @ x), ("false branch alone",
                                                              lambda x: x * 2.0))}
  timings = _harness.time_interleaved(
      {"pred=True": lambda: compiled(True, x), "pred=False": lambda: compiled(False, x)},
      rounds, warmup=2)
  return {"cost_model": cost(compiled), "parts": parts,
          "ms": {k: v.summary() for k, v in timings.items()}}


def slice_demo(rounds: int, leaves: int = 50, rank: int = 256, dim: int = 768) -> dict[str, Any]:
  """``draw``'s pattern: one vmapped Gaussian draw for `leaves` same-shape leaves, then
  ``x[j]`` per leaf, against one draw per leaf."""
  def one(key):
    return jax.random.normal(key, (rank, dim)) * (1 / math.sqrt(rank))

  def stacked(key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(leaves))
    draws = jax.vmap(one)(keys)
    return [draws[j] for j in range(leaves)]

  def mapped(key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(leaves))
    draws = jax.lax.map(one, keys)
    return [draws[j] for j in range(leaves)]

  def per_leaf(key):
    return [one(jax.random.fold_in(key, j)) for j in range(leaves)]

  key = jax.random.key(0)
  out, calls = {}, {}
  for name, f in (("vmap + slice", stacked), ("lax.map + slice", mapped),
                  ("per leaf", per_leaf)):
    jax.clear_caches()
    start = time.process_time()
    compiled = jax.jit(f).lower(key).compile()
    out[name] = {**cost(compiled), "compile_cpu_s": time.process_time() - start}
    calls[name] = lambda c=compiled: c(key)
  timings = _harness.time_interleaved(calls, rounds, warmup=2)
  for name, t in timings.items():
    out[name]["ms"] = t.summary(timings["per leaf"])
  return out


def time_steps(size: str, rank: int, rounds: int) -> dict[str, Any]:
  """Wall time of compiled steps on real arrays: the cond priced at its dear branch but not run."""
  shapes = _harness.gpt2_shapes(_harness.GPT2[size])
  params = _harness.random_tree(shapes, 0)
  grads = _harness.random_tree(shapes, 1, scale=1e-3, like_params=False)
  txs = {"optax.adafactor momentum=0.9 (naive)": (optax.adafactor(LR, momentum=0.9), None),
         f"flora_adafactor r={rank}": (flora_optax.flora_adafactor(LR, rank), None),
         f"flora_adafactor r={rank}, unfolded chain": (unfolded_adafactor(LR, rank), None),
         f"flora_adafactor r={rank}, cycle_step pinned (no cond)":
             (flora_optax.flora_adafactor(LR, rank), {"cycle_step": 1}),
         f"flora_momentum r={rank} kappa=None": (flora_optax.flora_momentum(rank, kappa=None),
                                                 None),
         "optax.ema(0.9)": (optax.ema(0.9), None)}
  calls = {}
  for name, (tx, pins) in txs.items():
    step = jax.jit(step_fn(tx, pins), donate_argnums=(0, 1))
    box = [jax.tree.map(jnp.copy, params)]
    box.append(tx.init(box[0]))

    def call(step=step, box=box):
      box[0], box[1] = step(box[0], box[1], grads)
      return box[0]
    calls[name] = call
  timings = _harness.time_interleaved(calls, rounds, warmup=1)
  base = timings["optax.adafactor momentum=0.9 (naive)"]
  return {name: t.summary(base) for name, t in timings.items()}


# ------------------------------------------------------------------------------ report


def _g(x: float) -> str:
  return f"{x / GB:.1f}" if x >= 10 * GB else f"{x / GB:.2f}"


def main_table(rows) -> str:
  header = ["tree", "params", "r", "optimizer", "GFLOP", "GB", "ordinary step GFLOP",
            "ordinary step GB", "floor GFLOP", "floor GB", "ordinary GB / floor", "compile s"]
  body = []
  for r in rows:
    o = r["ordinary"]
    body.append([r["tree"], r["dtype"], r["rank"] or "", r["optimizer"], _g(r["flops"]),
                 _g(r["bytes"]), _g(o["flops"]), _g(o["bytes"]),
                 _g(r["floor_flops"]) if r["floor_flops"] else "0", _g(r["floor_bytes"]),
                 f"{o['bytes'] / r['floor_bytes']:.1f}", f"{r['compile_s']:.1f}"])
  return _harness.markdown_table(header, body)


def accumulation_table(rows) -> str:
  header = ["tree", "params", "r", "optimizer", "path", "GFLOP", "GB", "floor GFLOP", "floor GB"]
  body = []
  for r in rows:
    if r["group"] != "accumulation":
      continue
    head = [r["tree"], r["dtype"], r["rank"] or "", r["optimizer"]]
    if "finish" not in r:
      body.append(head + ["every micro-step (inner update under jnp.where)", _g(r["flops"]),
                          _g(r["bytes"]), "0", _g(r["floor_bytes"])])
      continue
    body.append(head + ["as compiled (cost model: dearer branch)", _g(r["flops"]),
                        _g(r["bytes"]), _g(r["floor_flops_finish"]), _g(r["floor_bytes"])])
    body.append(head + ["accumulate only (mini_step < k-1)", _g(r["ordinary"]["flops"]),
                        _g(r["ordinary"]["bytes"]), _g(r["floor_flops"]), _g(r["floor_bytes"])])
    body.append(head + ["finish (mini_step = k-1)", _g(r["finish"]["flops"]),
                        _g(r["finish"]["bytes"]), _g(r["floor_flops_finish"]),
                        _g(r["floor_bytes"])])
    body.append(head + [f"amortized: (15·accumulate + finish)/{K_ACCUMULATE}",
                        _g(r["amortized"]["flops"]), _g(r["amortized"]["bytes"]),
                        _g(r["floor_flops_amortized"]), _g(r["floor_bytes"])])
  return _harness.markdown_table(header, body)


def pinned_table(rows) -> str:
  header = ["tree", "params", "r", "optimizer", "pinned", "ordinary step by attribution",
            "compiled with the counter pinned"]
  body = [[r["tree"], r["dtype"], r["rank"] or "", r["optimizer"], r["pinned"]["pins"],
           f"{_g(r['ordinary']['flops'])} GFLOP, {_g(r['ordinary']['bytes'])} GB",
           f"{_g(r['pinned']['flops'])} GFLOP, {_g(r['pinned']['bytes'])} GB"]
          for r in rows if "pinned" in r]
  return _harness.markdown_table(header, body)


def attribution_table(row) -> str:
  a = row["attribution"]
  header = ["where", "GFLOP", "GB", "GFLOP, loops x trips", "GB, loops x trips", "instructions"]

  def lines(buckets):
    return [[b, _g(v["flops"]), _g(v["bytes"]), _g(v["flops_x_trips"]), _g(v["bytes_x_trips"]),
             v["count"]] for b, v in buckets.items()]
  body = lines(a["buckets"])
  body.append(["**total (compiled step)**", _g(a["total"]["flops"]), _g(a["total"]["bytes"]),
               "", "", ""])
  text = _harness.markdown_table(header, body)
  for cond in a["conditionals"]:
    for i, branch in enumerate(cond["branches"]):
      text += (f"\n\nInside `{cond['op_name']}`, branch {i} ({'false' if i == 0 else 'true'}): "
               f"{_g(branch['total']['flops'])} GFLOP, {_g(branch['total']['bytes'])} GB\n\n")
      if branch["buckets"]:
        text += _harness.markdown_table(header, lines(branch["buckets"]))
  return text


def main() -> None:
  parser = _harness.arg_parser(__doc__, "2 blocks of GPT-2 small, r=256, fp32, a few rows")
  parser.add_argument("--rounds", type=int, default=5, help="timing rounds (full mode)")
  parser.add_argument("--no-timing", action="store_true", help="skip the GPT-2 wall times")
  parser.add_argument("--sizes", nargs="*", default=["small", "medium"],
                      choices=list(_harness.GPT2))
  parser.add_argument("--ranks", nargs="*", type=int, default=[64, 256])
  parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  parser.add_argument("--variants-everywhere", action="store_true",
                      help="price the flora_adafactor options on every tree, dtype and rank, "
                           "not only on GPT-2 small fp32")
  parser.add_argument("--only", nargs="*", default=None,
                      help="price only the optimizers whose name contains one of these")
  parser.add_argument("--exact", action="store_true",
                      help="--only names whole optimizer names, not parts of them")
  args = parser.parse_args()
  logging.getLogger("jax").setLevel(logging.ERROR)
  start = time.perf_counter()
  if args.quick:
    grid = [("small-2", jnp.float32, 256)]
  else:
    grid = [(s, jnp.dtype(d), r) for s in args.sizes for d in args.dtypes for r in args.ranks]
  rows = []
  for size, dtype, rank in grid:
    for config in configs():
      if args.quick and config.name not in QUICK:
        continue
      if args.only is not None and not any(
          o == config.name if args.exact else o in config.name for o in args.only):
        continue
      if config.variant and not args.quick and not args.variants_everywhere and (
          size, dtype) != ("small", jnp.dtype("float32")):
        continue
      if not config.ranked and rank != grid[0][2] and any(
          r["optimizer"] == config.name and r["tree"] == f"GPT-2 {size}"
          and r["dtype"] == jnp.dtype(dtype).name for r in rows):
        continue  # a baseline without a rank: once per tree and dtype
      check = size in ("small", "small-2") and rank == 256
      row = measure(config, size, dtype, rank, check_pin=check)
      rows.append(row)
      print(f"{row['tree']} {row['dtype']} r={rank} {config.name}: {_g(row['flops'])} GFLOP "
            f"{_g(row['bytes'])} GB (ordinary {_g(row['ordinary']['flops'])} / "
            f"{_g(row['ordinary']['bytes'])}) floor {_g(row['floor_flops'])} / "
            f"{_g(row['floor_bytes'])}  [{row['compile_s']:.1f} s]", flush=True)

  demos = {"cond": cond_demo(10 if args.quick else 30), "rng": rng_lowering_demo()}
  if not args.quick:
    demos["slice"] = slice_demo(args.rounds * 3)
  timing = None if args.quick or args.no_timing else time_steps("small", 256, args.rounds)

  tables = ["## Cost model per update step (update + apply_updates, state donated)\n",
            "GFLOP / GB: `compiled.cost_analysis()` of the compiled step. Ordinary step: the "
            "same step with each `lax.cond` priced at the branch that runs when it is not "
            "resampling (momentum) or finishing a cycle (accumulation). Floor GFLOP: the "
            "projection matmuls (2·n·m·r each; one down and one up per momentum step). Floor "
            "GB: read grads + params + state, write params + state.\n", main_table(rows)]
  if any(r["group"] == "accumulation" for r in rows):
    tables += ["\n## Accumulation per micro-step\n", accumulation_table(rows)]
  if any("pinned" in r for r in rows):
    tables += ["\n## Ordinary step: attribution against a compile with the counter pinned\n",
               "The attribution prices the compiled step with its conditional at the branch "
               "that runs; the pinned compile is another program, without the conditional, "
               "which XLA may fuse further (in accumulation the zero updates then fold into "
               "`apply_updates`). Where the two differ, the attribution is what the compiled "
               "step executes.\n", pinned_table(rows)]
  for row in rows:
    if row["optimizer"] in ("flora_adafactor", "flora_momentum kappa=None") and (
        row["tree"], row["dtype"], row["rank"]) == ("GPT-2 small", "float32", 256):
      tables += [f"\n## Attribution: {row['optimizer']}, {row['tree']}, {row['dtype']}, "
                 f"r={row['rank']}\n", attribution_table(row)]
  c = demos["cond"]
  tables += ["\n## A cond with a cheap false branch\n",
             _harness.markdown_table(
                 ["", "GFLOP", "GB", "median ms"],
                 [["cost model of the compiled cond", _g(c["cost_model"]["flops"]),
                   _g(c["cost_model"]["bytes"]), ""],
                  *[[k, _g(v["flops"]), _g(v["bytes"]), ""] for k, v in c["parts"].items()],
                  *[[f"run with {k}", "", "", f"{v['ms']:.2f}"] for k, v in c["ms"].items()]])]
  g = demos["rng"]
  tables += ["\n## One Gaussian draw (256 × 768, float32) as JAX lowers it for each platform\n",
             f"The draw itself is {g['bytes_of_the_draw'] / 1e6:.2f} MB; XLA's CPU cost model "
             f"prices its compiled CPU program at {g['cpu_cost_model']['bytes'] / 1e6:.2f} MB "
             "(the threefry loop counted for one trip).\n",
             _harness.markdown_table(
                 ["platform", "while loops", "StableHLO ops"],
                 [[p, g[p]["while_loops"], g[p]["stablehlo_ops"]]
                  for p in ("cpu", "cuda", "tpu")])]
  if "slice" in demos:
    tables += ["\n## 50 same-shape (256, 768) Gaussian draws: vmap + slice against per leaf\n",
               _harness.markdown_table(
                   ["", "GFLOP", "GB", "compile CPU s", "median ms (IQR)", "ratio to per leaf"],
                   [[k, _g(v["flops"]), _g(v["bytes"]), f"{v['compile_cpu_s']:.1f}",
                     f"{v['ms']['ms']:.1f} ({v['ms']['ms_p25']:.1f}-{v['ms']['ms_p75']:.1f})",
                     f"{v['ms']['ratio']:.2f}"] for k, v in demos["slice"].items()])]
  if timing:
    tables += ["\n## Wall time of the compiled step, GPT-2 small fp32, CPU\n",
               _harness.markdown_table(
                   ["step", "median ms (IQR)", "ratio to naive (IQR)"],
                   [[k, f"{v['ms']:.0f} ({v['ms_p25']:.0f}-{v['ms_p75']:.0f})",
                     f"{v['ratio']:.2f} ({v['ratio_p25']:.2f}-{v['ratio_p75']:.2f})"]
                    for k, v in timing.items()])]
  out = _harness.results_dir("cost_model", args.quick, args.out)
  text = "\n".join(tables)
  info = _harness.write_report(out, "cost_model", {"rows": rows, "demos": demos,
                                                   "timing": timing}, text)
  print(f"\nMachine: {_harness.machine_line(info)}\n")
  print(text)
  print(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
