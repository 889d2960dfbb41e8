"""Shardings of an optimizer state, derived from the shardings of the parameters.

A compressed buffer does not have its parameter's shape, so it cannot simply reuse the
parameter's sharding the way ``optax.ema``'s full-size buffer can. Every compressed buffer
carries its layout (which parameter axes each of its axes stands for), and
:func:`state_shardings` reads it from there: nothing is guessed from shapes. Buffers of other
transforms (``optax`` chains, Adafactor's factored ``v_row``/``v_col``) are matched with the
parameter they belong to by their position in the state.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from flora_optax import _buffers, _layout


def state_shardings(tx: Any, params: Any, param_shardings: Any) -> Any:
  """Shardings for ``tx.init(params)``, derived from the shardings of ``params``.

  The state's shape is found with ``jax.eval_shape(tx.init, params)`` (nothing is
  allocated). Every sub-tree of the state with the structure of ``params`` (a Flora
  ``compressed_mu``/``compressed_acc``, an ``optax.ema`` buffer, Adafactor's ``v_row``,
  ``v_col`` and ``v``, ...) is matched leaf by leaf with the parameters, and each array gets:

  * for a **compressed buffer**: the parameter's partitioning on the axes its layout says
    it keeps (batch axes, and the side the sketch does not compress); a sketch axis
    (``rank``, ``k``, ``l``) is replicated. A parameter sharded on a compressed side
    therefore has that axis replicated in the buffer. When a buffer axis stands for several
    parameter axes (``MatrixAxes(rows=0, cols=(1, 2))``) it keeps the sharding of the leading
    one if only that one is sharded (axes of size 1 before it are ignored), and is
    replicated otherwise;
  * **the parameter's sharding** if it has the parameter's shape (uncompressed buffers,
    full-size buffers of other transforms);
  * for a buffer with **one axis of the parameter removed** (factored second moments): the
    parameter's partitioning without that axis;
  * anything else (counters, PRNG key data, Adafactor's ``(1,)`` placeholders) is
    **replicated**, with a warning for an array of two or more axes.

  An int8 buffer (``dtype="int8"``, an :class:`flora_optax.Int8Blocks`) gets the sharding
  above for its codes and the same for its block scales, which therefore live with their
  blocks; the scales' last axis keeps its mesh axes only where each shard holds whole blocks
  of 256 (a multiple of ``256 ×`` the shard count), and is replicated with a warning
  otherwise.

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
    >>> specs.compressed_mu["w"].parts["c"].spec, specs.key_data.spec
    (P('data', None), P())
    >>> state = jax.jit(tx.init, out_shardings=specs)(params)

  Args:
    tx: the optimizer (anything with an ``init``).
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``), as passed to
      ``tx.init``.
    param_shardings: a tree like ``params`` of ``jax.sharding.NamedSharding`` (all on one
      mesh), or a single ``NamedSharding`` for every parameter.

  Returns:
    A tree with the structure of ``jax.eval_shape(tx.init, params)`` whose leaves are
    ``NamedSharding`` s: use it as ``out_shardings`` of a jitted ``tx.init``, as the
    ``in_shardings``/``out_shardings`` of a train step, or as the ``sharding`` of the
    ``jax.ShapeDtypeStruct`` target of an orbax restore.
  """
  params_def = jax.tree.structure(params)
  names = _layout.leaf_names(params)
  param_leaves = jax.tree.leaves(params)
  sharding_leaves = _param_sharding_leaves(params_def, param_shardings, names)
  mesh = sharding_leaves[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())

  def is_params_like(node):
    if node is None:
      return False
    if _buffers.is_compressed(node):
      # A bare array is a tree of one leaf (optax allows it): its buffer is the node itself.
      return jax.tree_util.treedef_is_leaf(params_def)
    try:
      params_def.flatten_up_to(node)
    except (ValueError, TypeError):
      return False
    # With a single parameter every leaf would match: ask for the same structure then.
    return params_def.num_leaves > 1 or jax.tree.structure(
        node, is_leaf=_buffers.is_compressed) == params_def

  def shard_buffer(path, name, leaf, sharding, buffer):
    shape, spec = tuple(jax.numpy.shape(leaf)), _full_spec(sharding.spec, leaf)
    def with_scales(part, part_spec, where):
      """The sharding of one buffer array; an int8 one gets its scales' sharding beside."""
      array_sharding = NamedSharding(mesh, part_spec, memory_kind=sharding.memory_kind)
      if not _buffers.is_int8(part):
        return array_sharding
      scale_spec = _scale_spec(mesh, tuple(part_spec) + (None,) * (len(part.shape) - len(
          part_spec)), part.shape, part.block, f"state{where} for {name} {shape}")
      return _buffers.Int8Blocks(array_sharding, NamedSharding(
          mesh, scale_spec, memory_kind=sharding.memory_kind), part.block)

    where = jax.tree_util.keystr(tuple(path))
    if _buffers.is_compressed(buffer):
      axes = buffer.sketch.buffer_axes(buffer.leaf)
      return _buffers.Compressed(
          {k: with_scales(part, PartitionSpec(*(None if group is None else
                                                _group_spec(shape, spec, group)
                                                for group in axes[k])), where)
           for k, part in buffer.parts.items()}, buffer.leaf, buffer.sketch, buffer.spec)
    if _buffers.is_int8(buffer):  # a plain leaf stored in int8: codes shard as the leaf
      return with_scales(buffer, sharding.spec, where)

    def plain(array):
      rule = _plain_spec(shape, spec, tuple(array.shape))
      if rule is None:
        if len(array.shape) >= 2:
          warnings.warn(f"state_shardings: a buffer of shape {tuple(array.shape)} at state"
                        f"{jax.tree_util.keystr(tuple(path))} for {name} {shape} matches no "
                        f"rule and is replicated", stacklevel=4)
        return replicated
      return sharding if rule == sharding.spec else NamedSharding(
          mesh, rule, memory_kind=sharding.memory_kind)
    return jax.tree.map(plain, buffer)

  def shard_node(path, node):
    if not is_params_like(node):
      return jax.tree.map(lambda _: replicated, node)
    return jax.tree.unflatten(params_def, [
        shard_buffer(path, *args) for args in zip(names, param_leaves, sharding_leaves,
                                                  params_def.flatten_up_to(node))])

  return jax.tree_util.tree_map_with_path(shard_node, jax.eval_shape(tx.init, params),
                                          is_leaf=is_params_like)


def _scale_spec(mesh, spec: tuple, shape: tuple[int, ...], block: int, what: str):
  """PartitionSpec of the block scales of an int8 array of `shape` sharded as `spec`.

  The scales ``(..., ceil(L / block))`` follow the array on every leading axis. On the last
  axis they keep its mesh axes when every shard holds whole blocks (``L`` a multiple of
  ``block`` times the shard count): each device then quantizes and reads its own blocks,
  and nothing moves. Otherwise a block straddles shards and the scales are replicated on that
  axis, with a warning: quantizing then needs the absmax of entries on several devices.
  """
  last = spec[-1]
  if last is None:
    return PartitionSpec(*spec)
  names = last if isinstance(last, tuple) else (last,)
  shards = 1
  for axis_name in names:
    shards *= mesh.shape[axis_name]
  length = shape[-1]
  if shards == 1 or length % (shards * block) == 0:
    return PartitionSpec(*spec)
  warnings.warn(
      f"state_shardings: the int8 blocks of {block} entries along the last axis (length "
      f"{length}) of {what} straddle its {shards} shards on mesh axes {names}; their scales "
      f"are replicated on that axis and quantizing gathers entries across devices. Shard "
      f"that axis so each shard holds a multiple of {block} entries, or not at all",
      stacklevel=5)
  return PartitionSpec(*spec[:-1], None)


def _param_sharding_leaves(params_def, param_shardings, names) -> list[NamedSharding]:
  if isinstance(param_shardings, jax.sharding.Sharding):
    leaves = [param_shardings] * params_def.num_leaves
  else:
    try:
      leaves = params_def.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(f"param_shardings must be a single NamedSharding or a tree with the "
                       f"structure of params ({params_def}): {e}") from e
  for name, s in zip(names, leaves):
    if not isinstance(s, NamedSharding):
      raise TypeError(f"the sharding of {name} must be a jax.sharding.NamedSharding, got {s!r}")
  if not leaves:
    raise ValueError("params has no leaves; there is nothing to derive shardings from")
  if len({s.mesh for s in leaves}) > 1:
    raise ValueError(f"all parameter shardings must use one mesh, got "
                     f"{len({s.mesh for s in leaves})} meshes")
  return leaves


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


def _plain_spec(shape, spec, buffer_shape):
  """PartitionSpec of an uncompressed buffer of a parameter of `shape` sharded as `spec`."""
  if buffer_shape == shape:
    return PartitionSpec(*spec)
  if buffer_shape == ():
    return PartitionSpec()
  if len(buffer_shape) == len(shape) - 1:
    for dropped in range(len(shape)):
      if shape[:dropped] + shape[dropped + 1:] == buffer_shape:
        return PartitionSpec(*(spec[:dropped] + spec[dropped + 1:]))
  return None
