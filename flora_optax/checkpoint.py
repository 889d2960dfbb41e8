"""Restoring Flora states: a state is read only by a transform of the options it was saved with.

A buffer's arrays do not say which sketch wrote them (a DCT and a Gaussian projection buffer
have the same shape), so each Flora state records its ``layout`` (version, sketch, projection,
side), and :func:`check_layout` compares it with the options of the transform a state was
restored for (which the restored tree takes from its abstract target). States saved before
0.2.0 record no layout: :func:`restore` reads them only into a transform with the Gaussian
projection they were written with by default (or with ``unrecorded_layout=True``), says which
options to set otherwise, and refuses 0.1.0 states, which no 0.2 option continues.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _buffers, _options
from flora_optax.accumulation import FloraAccumulateState
from flora_optax.momentum import FloraMomentumState

_STATES = (FloraMomentumState, FloraAccumulateState)
# What states without a layout record were written with, by default: the Gaussian projection.
_PRE_LAYOUT_DEFAULTS = {"sketch": "projection", "projection": "gaussian", "side": "smaller"}


def _is_state(x) -> bool:
  return isinstance(x, _STATES)


def _buffers_of(state):
  return state.compressed_mu if isinstance(state, FloraMomentumState) else state.compressed_acc


def _expected(state) -> tuple[int, dict] | None:
  """The layout code of the transform `state` belongs to, from the static options of its
  compressed nodes (``None`` where it compresses nothing: any layout reads it)."""
  nodes = [n for n in _buffers.nodes(_buffers_of(state)) if _buffers.is_compressed(n)]
  if not nodes:
    return None
  spec = nodes[0].options
  options = {k: spec[k] for k in ("sketch", "projection", "side")}
  return _options.layout_code_of(**options), options


def _states(tree) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_state)
  return [(jax.tree_util.keystr(path), x) for path, x in flat if _is_state(x)]


def check_layout(state: Any) -> None:
  """Raises if a Flora state inside `state` was saved under other compression options.

  Call it on a restored state (outside ``jit``): each :class:`FloraMomentumState` and
  :class:`FloraAccumulateState` holds the ``layout`` it was saved with, and its compressed
  nodes the options of the transform it was restored for. :func:`restore` calls it.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> saved = flora_optax.flora_momentum(8, projection="gaussian").init(params)
    >>> target = flora_optax.flora_momentum(8).init(params)   # the DCT projection (0.2)
    >>> restored = target._replace(layout=saved.layout, compressed_mu=target.compressed_mu)
    >>> flora_optax.check_layout(restored)
    Traceback (most recent call last):
    ...
    ValueError: state: the state was saved with sketch='projection', projection='gaussian'...
  """
  for where, node in _states(state):
    expected = _expected(node)
    if expected is None:
      continue
    if isinstance(node.layout, jax.core.Tracer):
      raise TypeError("check_layout reads the saved layout's value: call it outside jit, on "
                      "the restored state")
    error = _options.layout_error(where or "state", np.asarray(node.layout), expected[0])
    if error:
      raise ValueError(error)


def _without_layout(tree):
  """`tree` with each Flora state as a dict of its fields less ``layout`` (0.1's layout)."""
  return jax.tree.map(lambda x: {k: v for k, v in x._asdict().items() if k != "layout"}
                      if _is_state(x) else x, tree, is_leaf=_is_state)


def restore(path, abstract: Any, checkpointer: Any = None, *,
            unrecorded_layout: bool = False) -> Any:
  """``checkpointer.restore(path, abstract)`` (orbax), then :func:`check_layout`.

  Checkpoints written before 0.2.0 record no ``layout``:

  * 0.2.0 development states (with ``cycle``, ``cycle_step`` and ``kappa`` but no
    ``layout``) were written with the Gaussian projection by default (``sketch="projection",
    projection="gaussian"``; 0.2 uses the DCT projection for momentum and the two-sided sketch
    for accumulation). They are restored into a transform built with those options; into any
    other, this raises an error naming the options to set. If the saving run set other
    options itself, build the transform with those and pass ``unrecorded_layout=True``.
  * 0.1.0 states (``count``, ``key_data`` and the buffers only) drew each leaf's projection
    from its position in the tree; 0.2 draws it from the leaf's path, so no option continues
    them: the error says so (restore the parameters alone and start a fresh state).

  Args:
    path: the checkpoint's directory.
    abstract: the tree to restore onto (``jax.eval_shape`` of the state, or of a dict holding
      it), as for ``orbax.checkpoint.StandardCheckpointer.restore``.
    checkpointer: an orbax checkpointer (default: a new ``StandardCheckpointer``).
    unrecorded_layout: accept a checkpoint without a layout record into a transform whose
      options are not the Gaussian projection.

  Returns:
    The restored tree, each Flora state's ``layout`` that of the transform.
  """
  import orbax.checkpoint as ocp  # an optional dependency: only restoring needs it

  own = checkpointer is None
  checkpointer = ocp.StandardCheckpointer() if own else checkpointer
  try:
    try:
      restored = checkpointer.restore(path, abstract)
    except ValueError as error:
      saved = _saved_leaves(checkpointer, path)
      old = _old_states(saved, abstract)
      if not old:
        why = _storage_mismatch(saved, path, abstract)
        if why:
          raise ValueError(why) from error
        raise
      if any(kind == "0.1.0" for _, kind in old):
        where = next(w for w, kind in old if kind == "0.1.0")
        raise ValueError(
            f"{where or 'state'}: the checkpoint at {path} holds a Flora state written by "
            f"flora_optax 0.1.0 (compressed buffers as bare arrays, no layout). 0.1.0 drew each "
            f"leaf's projection from its position in the tree, 0.2 from its path, so no option "
            f"of 0.2 continues it: restore the parameters alone and start the optimizer from "
            f"tx.init(params), or finish that run with flora_optax 0.1.0") from error
      restored = _restore_unrecorded(checkpointer, path, abstract, unrecorded_layout)
  finally:
    if own:
      checkpointer.close()
  check_layout(restored)
  return restored


def _names(path) -> tuple[str, ...]:
  """A key path as plain names (orbax's metadata and ``eval_shape`` trees key differently)."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def _saved_leaves(checkpointer, path) -> dict[tuple[str, ...], Any]:
  """The checkpoint's arrays by plain path names, with their metadata (shape, dtype)."""
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  return {_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      metadata, is_leaf=lambda x: hasattr(x, "shape"))[0]}


def _describe_buffer(leaves: dict[tuple[str, ...], Any]) -> str:
  """A buffer's arrays (names below its ``parts``) as storage words: int8 codes with scales,
  else each array's dtype and shape."""
  if not leaves:
    return "no buffer"
  last = lambda name: name[-1] if name else None  # noqa: E731 (a plain array's name is ())
  if any(last(n) == "q" for n in leaves) and any(last(n) == "scale" for n in leaves):
    codes = {n[:-1]: tuple(m.shape) for n, m in leaves.items() if last(n) == "q"}
    return "int8 codes with block scales (" + ", ".join(
        f"{'/'.join(n) or 'buffer'}: {shape}" for n, shape in codes.items()) + ")"
  return ", ".join(f"{'/'.join(n) or 'buffer'}: {np.dtype(m.dtype).name} {tuple(m.shape)}"
                   for n, m in leaves.items())


def _storage_mismatch(saved, path, abstract) -> str | None:
  """Why the checkpoint's buffers (`saved`, from :func:`_saved_leaves`) do not fit
  `abstract`'s (another ``dtype``, ``plain_dtype``, ``rank`` or sketch), naming the first such
  buffer; ``None`` if they all fit."""
  node = lambda x: _buffers.is_compressed(x) or _buffers.is_int8(x)  # noqa: E731
  for node_path, leaf in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=node)[0]:
    base = _names(node_path) + (("parts",) if _buffers.is_compressed(leaf) else ())
    arrays = leaf.parts if _buffers.is_compressed(leaf) else leaf
    want = {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(arrays)[0]}
    have = {n[len(base):]: m for n, m in saved.items() if n[:len(base)] == base}
    fits = set(want) == set(have) and all(
        tuple(have[n].shape) == tuple(x.shape) and np.dtype(have[n].dtype) == np.dtype(x.dtype)
        for n, x in want.items())
    if fits:
      continue
    where = jax.tree_util.keystr(node_path)
    if _buffers.is_compressed(leaf):
      what = "this compressed buffer"
      detail = (f" (the leaf {leaf.leaf.shape} at rank {leaf.leaf.rank}, "
                f"{leaf.options['sketch']}, dtype {leaf.options['dtype']})")
    else:
      what, detail = "this buffer", ""
    return (f"{where}: the checkpoint at {path} stores {what} as {_describe_buffer(have)}, "
            f"and the state to restore holds {_describe_buffer(want)}{detail}: build the "
            f"transform with the saving run's dtype, plain_dtype, rank and sketch to restore it")
  return None


def _old_states(saved, abstract) -> list[tuple[str, str]]:
  """The Flora states of `abstract` that the checkpoint (`saved`, from :func:`_saved_leaves`)
  holds in an older format, with ``"pre-layout"`` (0.2.0 development) or ``"0.1.0"``."""
  prefixes = {p[:i] for p in saved for i in range(len(p) + 1)}
  flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_state)[0]
  old = []
  for state_path, node in ((p, x) for p, x in flat if _is_state(x)):
    base = _names(state_path)
    if base + ("layout",) in saved or base not in prefixes:
      continue
    # Flora's own leaves (not the wrapped optimizer's) all saved but `layout`: a 0.2.0
    # development state; anything else (no counters, buffers as bare arrays) is 0.1.0's.
    own = {f: getattr(node, f) for f in node._fields
           if f not in ("layout", "skip_state", "inner_opt_state")}
    # A compressed buffer's parts depend on the sketch: only its `parts` level is compared.
    leaves = [base + _names(p) for p, _ in jax.tree_util.tree_flatten_with_path(own)[0]]
    leaves = [leaf[:leaf.index("parts") + 1] if "parts" in leaf else leaf for leaf in leaves]
    kind = "pre-layout" if all(leaf in prefixes for leaf in leaves) else "0.1.0"
    old.append((jax.tree_util.keystr(state_path), kind))
  return old


def _restore_unrecorded(checkpointer, path, abstract, unrecorded_layout):
  """Restores a checkpoint whose Flora states have no ``layout`` onto `abstract`."""
  legacy = _options.layout_code_of(**_PRE_LAYOUT_DEFAULTS)
  for where, node in _states(abstract):
    expected = _expected(node)
    if expected is None or expected[0] == legacy or unrecorded_layout:
      continue
    code, options = expected
    wanted = ", ".join(f"{k}={v!r}" for k, v in _PRE_LAYOUT_DEFAULTS.items()
                       if options[k] != v)
    raise ValueError(
        f"{where or 'state'}: the checkpoint at {path} was written before 0.2.0 and records "
        f"no layout; the default then was {_options.describe_layout(legacy)}, and this "
        f"transform reads {_options.describe_layout(code)}. If the saving run used those "
        f"defaults, build the transform with {wanted} to read it (for momentum also "
        f"emit='compressed', the old default, to continue the same updates); if it set its own "
        f"options, build it with those and pass unrecorded_layout=True")
  restored = checkpointer.restore(path, _without_layout(abstract))

  def rebuild(target, got):
    if not _is_state(target):
      return got
    expected = _expected(target)
    return type(target)(**got, layout=jnp.asarray(expected[0] if expected else legacy,
                                                  jnp.int32))

  return jax.tree.map(rebuild, abstract, restored, is_leaf=_is_state)
