"""Checks for multi-process (multi-host) training with ``jax.distributed``."""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flora_optax import _buffers

# What is compared across processes. Every option that shapes a sketch is static metadata of
# the compressed buffers; the seed is in the key data; "layout" covers the rest (which leaves
# are compressed, their matrix views and shapes).
CHECKED = ("seed", "kappa", "rank", "transfer", "sketch", "projection", "side", "dtype",
           "plain_dtype", "precision", "prng_impl", "layout")
_RECORDED = {".key_data": "seed", ".kappa": "kappa"}


def _fingerprints(state: Any) -> np.ndarray:
  values: dict[str, list] = {name: [] for name in CHECKED}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_buffers.is_compressed)[0]:
    where = jax.tree_util.keystr(path)
    if _buffers.is_compressed(leaf):
      options = leaf.options
      for name in CHECKED[2:-1]:
        values[name].append((where, options.get(name)))
      values["layout"].append((where, leaf.leaf, sorted(
          (k, tuple(v.shape)) for k, v in leaf.parts.items())))
    elif any(where.endswith(suffix) for suffix in _RECORDED):
      name = next(v for k, v in _RECORDED.items() if where.endswith(k))
      local = leaf.addressable_shards[0].data if isinstance(leaf, jax.Array) else leaf
      values[name].append((where, np.asarray(local).tolist()))
    else:
      values["layout"].append((where, tuple(np.shape(leaf)), str(np.dtype(leaf.dtype))))
  return np.array([zlib.crc32(repr(values[name]).encode()) for name in CHECKED], np.uint32)


def check_processes_agree(state: Any) -> None:
  """Raises if the processes of a multi-process run built their Flora transforms differently.

  A process started with another ``seed``, ``rank``, ``kappa`` or other option would draw
  other sketches for its shards and corrupt the run without an error. Call this once on
  every process (it is a collective: all must call it) with the optimizer state after
  ``init``; it gathers a fingerprint of each option (a few bytes per process) and raises a
  ``ValueError`` naming the options that differ. With one process it returns at once.

  Example:
    >>> import jax.numpy as jnp, flora_optax
    >>> tx = flora_optax.flora_momentum(rank=4)
    >>> flora_optax.check_processes_agree(tx.init({"w": jnp.ones((16, 8))}))
  """
  if jax.process_count() == 1:
    return
  local = _fingerprints(state)
  every = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
  differ = [name for i, name in enumerate(CHECKED) if len(set(every[:, i].tolist())) > 1]
  if differ:
    odd = {name: [p for p in range(every.shape[0]) if every[p, CHECKED.index(name)]
                  != every[0, CHECKED.index(name)]] for name in differ}
    raise ValueError(
        f"the processes built their Flora optimizers with different options: "
        f"{', '.join(differ)} differ (processes that differ from process 0: {odd}). Build "
        f"the optimizer with the same seed and options on every process.")
