"""Shardings of an optimizer state, derived from the shardings of the parameters.

A Flora buffer of a compressed leaf has the leaf's shape with its compressed side replaced by
``rank`` (``(*batch, n, rank)`` or ``(*batch, rank, m)``), so it cannot simply reuse the
parameter's sharding the way ``optax.ema``'s full-size buffer can. :func:`state_shardings`
maps every leaf of any optimizer state (Flora transforms, ``optax`` chains, wrapped inner
states such as Adafactor's factored ``v_row``/``v_col``) to a sharding derived from the
sharding of the parameter it belongs to.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from flora_optax import _compression as comp


def state_shardings(
    tx: Any,
    params: Any,
    param_shardings: Any,
    *,
    axes: Any = None,
) -> Any:
  """Shardings for ``tx.init(params)``, derived from the shardings of ``params``.

  The state's shape is found with ``jax.eval_shape(tx.init, params)`` (nothing is
  allocated). Every sub-tree of the state with the structure of ``params`` (a Flora
  ``compressed_mu``/``compressed_acc``, an ``optax.ema`` buffer, Adafactor's ``v_row``,
  ``v_col`` and ``v``, ...) is matched leaf by leaf with the parameters, and each buffer gets:

  * **the parameter's sharding** if it has the parameter's shape (uncompressed Flora buffers,
    full-size buffers of other transforms);
  * for a **Flora-compressed buffer** ``(*batch, n, rank)`` or ``(*batch, rank, m)``: the
    parameter's partitioning on the batch axes and on the uncompressed side; the ``rank``
    axis is replicated. A parameter sharded on its compressed side therefore has that axis
    replicated in the buffer (it is only ``rank`` long). When a side groups several axes of
    the parameter (``MatrixAxes(rows=0, cols=(1, 2))``) the group keeps the sharding of its
    leading axis if only that one is sharded (axes of size 1 before it are ignored), and is
    replicated otherwise;
  * for a buffer with **one axis of the parameter removed** (Adafactor's factored second
    moments): the parameter's partitioning without that axis;
  * anything else (counters, PRNG key data, Adafactor's ``(1,)`` placeholders) is
    **replicated**. A buffer of two or more axes that matches none of the rules is also
    replicated, with a warning: pass the ``axes`` the transform was built with.

  To keep a compressed buffer sharded, shard a parameter on the side that Flora does *not*
  compress (the larger side, with the default ``side="smaller"``).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flora_optax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros(64)}
    >>> shardings = {"w": NamedSharding(mesh, P("data", None)),
    ...              "b": NamedSharding(mesh, P())}
    >>> tx = flora_optax.flora_momentum(rank=8)
    >>> specs = flora_optax.state_shardings(tx, params, shardings)
    >>> specs.compressed_mu["w"].spec, specs.key_data.spec
    (P('data', None), P())
    >>> state = jax.jit(tx.init, out_shardings=specs)(params)

  Args:
    tx: the optimizer (anything with an ``init``).
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``), as passed to
      ``tx.init``.
    param_shardings: a tree like ``params`` of ``jax.sharding.NamedSharding`` (all on one
      mesh), or a single ``NamedSharding`` for every parameter.
    axes: the ``axes`` option the Flora transforms in ``tx`` were built with (``None``:
      their default view). Only needed for leaves with more than two axes.

  Returns:
    A tree with the structure of ``jax.eval_shape(tx.init, params)`` whose leaves are
    ``NamedSharding`` s: use it as ``out_shardings`` of a jitted ``tx.init``, as the
    ``in_shardings``/``out_shardings`` of a train step, or as the ``sharding`` of the
    ``jax.ShapeDtypeStruct`` target of an orbax restore.
  """
  params_def = jax.tree.structure(params)
  param_leaves = jax.tree.leaves(params)
  if isinstance(param_shardings, jax.sharding.Sharding):
    sharding_leaves = [param_shardings] * len(param_leaves)
  else:
    try:
      sharding_leaves = params_def.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"param_shardings must be a single NamedSharding or a tree with the structure of "
          f"params ({params_def}): {e}") from e
  meshes = set()
  for (path, _), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], sharding_leaves):
    if not isinstance(s, NamedSharding):
      raise TypeError(f"the sharding of {comp.path_str(path)} must be a "
                      f"jax.sharding.NamedSharding, got {s!r}")
    meshes.add(s.mesh)
  if len(meshes) > 1:
    raise ValueError(f"all parameter shardings must use one mesh, got {len(meshes)} meshes")
  if not meshes:
    raise ValueError("params has no leaves; there is nothing to derive shardings from")
  mesh = meshes.pop()
  replicated = NamedSharding(mesh, PartitionSpec())

  # The matrix view of every leaf, as the Flora transforms compute it with the same `axes`.
  axes_leaves = comp._resolve_tree_option(  # pylint: disable=protected-access
      axes, params, "axes", is_leaf=lambda x: isinstance(x, comp.MatrixAxes))
  views = [_view_groups(comp.path_str(path), tuple(jax.numpy.shape(leaf)), leaf_axes)
           for (path, leaf), leaf_axes in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                              axes_leaves)]

  state_shape = jax.eval_shape(tx.init, params)

  def is_params_like(node):
    return node is not None and jax.tree.structure(node) == params_def

  def shard_params_like(path, node):
    if not is_params_like(node):
      return jax.tree.map(lambda _: replicated, node)
    buffers = params_def.flatten_up_to(node)
    out = []
    for leaf, buffer, sharding, view, (leaf_path, _) in zip(
        param_leaves, buffers, sharding_leaves, views,
        jax.tree_util.tree_flatten_with_path(params)[0]):
      spec = _buffer_spec(tuple(jax.numpy.shape(leaf)), _full_spec(sharding.spec, leaf),
                          tuple(buffer.shape), view)
      if spec is None:
        if len(buffer.shape) >= 2:
          warnings.warn(
              f"state_shardings: a buffer of shape {tuple(buffer.shape)} at state"
              f"{jax.tree_util.keystr(tuple(path))} for {comp.path_str(leaf_path)} "
              f"{tuple(jax.numpy.shape(leaf))} matches no rule and is replicated; pass the "
              f"`axes` the Flora transforms were built with", stacklevel=3)
        out.append(replicated)
      elif spec == sharding.spec:
        out.append(sharding)
      else:
        out.append(NamedSharding(mesh, spec, memory_kind=sharding.memory_kind))
    return jax.tree.unflatten(params_def, out)

  return jax.tree_util.tree_map_with_path(shard_params_like, state_shape,
                                          is_leaf=is_params_like)


def _view_groups(name: str, shape: tuple[int, ...], axes) -> tuple | None:
  """(batch, rows, cols) axis groups of a leaf's matrix view, or None for < 2 axes."""
  ndim = len(shape)
  if ndim < 2:
    return None
  comp._matrix_view(name, shape, axes)  # pylint: disable=protected-access  # validates
  if axes is None:
    axes = comp.MatrixAxes(rows=tuple(range(ndim - 1)), cols=ndim - 1)
  return tuple(tuple(a % ndim for a in comp._as_tuple(getattr(axes, label)))  # pylint: disable=protected-access
               for label in ("batch", "rows", "cols"))


def _full_spec(spec: PartitionSpec, leaf) -> tuple:
  """The partition spec as one entry per axis of `leaf` (missing trailing entries: None)."""
  ndim = len(jax.numpy.shape(leaf))
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f"partition spec {spec} has more entries than the {ndim} axes of a "
                     f"leaf of shape {tuple(jax.numpy.shape(leaf))}")
  return entries + (None,) * (ndim - len(entries))


def _group_spec(shape: tuple[int, ...], spec: tuple, group: tuple[int, ...]):
  """Sharding of the axis that merges the parameter axes `group` (row-major), or None.

  Only a merge whose blocks stay contiguous is kept: the first axis of the group with size
  larger than one is the only sharded one.
  """
  sharded = [a for a in group if spec[a] is not None]
  if not sharded:
    return None
  leading = [a for a in group if shape[a] > 1]
  if len(sharded) == 1 and leading and sharded[0] == leading[0]:
    return spec[sharded[0]]
  return None


def _buffer_spec(shape, spec, buffer_shape, view):
  """PartitionSpec for one buffer of a parameter of `shape` sharded as `spec`, or None."""
  if buffer_shape == shape:
    return PartitionSpec(*spec)
  if buffer_shape == ():
    return PartitionSpec()
  if view is not None:
    batch, rows, cols = view
    batch_shape = tuple(shape[a] for a in batch)
    n, m = math.prod(shape[a] for a in rows), math.prod(shape[a] for a in cols)
    nb = len(batch)
    if len(buffer_shape) == nb + 2 and buffer_shape[:nb] == batch_shape:
      batch_spec = tuple(spec[a] for a in batch)
      if buffer_shape[nb:] == (n, buffer_shape[-1]) and buffer_shape[-1] < m:
        # side "cols": (*batch, n, rank)
        return PartitionSpec(*batch_spec, _group_spec(shape, spec, rows), None)
      if buffer_shape[nb:] == (buffer_shape[nb], m) and buffer_shape[nb] < n:
        # side "rows": (*batch, rank, m)
        return PartitionSpec(*batch_spec, None, _group_spec(shape, spec, cols))
  if len(buffer_shape) == len(shape) - 1:
    for dropped in range(len(shape)):
      if shape[:dropped] + shape[dropped + 1:] == buffer_shape:
        return PartitionSpec(*(spec[:dropped] + spec[dropped + 1:]))
  return None
