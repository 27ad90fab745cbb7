"""Device meshes and the one table that places logical axes on them.

Layers name the axes of every parameter and activation (`("embed", "mlp")`,
`("batch", "length", "embed")`); caches are named here. `RULES` is the only place that decides
where those names live on the mesh axes, so changing a run's parallelism is a config change
(`mesh.data`, `mesh.fsdp`, `mesh.tensor`), never a model change:

- `data`: splits the batch; parameters are replicated.
- `fsdp`: splits the batch too, and parameters and optimizer state along `embed` (gathered a
  layer at a time by XLA in the forward and backward passes).
- `tensor`: splits heads, MLP units and the vocabulary.

A dimension that its mesh axes do not divide (a vocabulary of 50,257, a decode batch of 1)
stays whole on them instead of failing: the bytes per device then show what was not split.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from kvjax.config import MeshConfig
from kvjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Precedence is top-down, and a mesh axis serves one dimension of an array: activations
# `("batch", ..., "embed")` keep `embed` whole because `batch` took `fsdp` first.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("cache_batch", BATCH_AXES),
    ("length", None),
    ("cache_sequence", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("cache_kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("cache_head_dim", None),
    ("layers", None),  # the group axis of scanned layers: every device holds every layer
    ("cache_layers", None),
)

# A cache leaf named `k` or `v` is a `[B, S, K, D]` buffer, or a `[G, B, S, K, D]` stack of them
# for scanned layers; every other cache leaf (positions, block tokens, shifts) has the batch
# first and nothing else worth splitting.
KV_BUFFER_AXES = ("cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")
KV_STACK_AXES = ("cache_layers", *KV_BUFFER_AXES)


# ------------------------------------------------------------------------------------------
# Meshes.


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """`(data, fsdp, tensor)` with a -1 filled in so that the product is `num_devices`."""
  shape = [cfg.data, cfg.fsdp, cfg.tensor]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"mesh: the fixed axes {tuple(shape)} (product {known}) must divide the "
                        f"{num_devices} devices for -1 to fill in")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(shape)} for {tuple(shape)}, but "
                      f"there are {num_devices} devices; set one axis to -1 or make the "
                      f"product {num_devices}")
  return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: all, every process) with Auto axes,
  so that jit propagates shardings and layers only constrain what they name."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(mesh_shape(cfg, len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(cfg: MeshConfig, num_devices: int) -> AbstractMesh:
  """The mesh of `num_devices` devices without the devices: enough to place shapes and count
  bytes per device for a pod slice from a laptop."""
  return AbstractMesh(mesh_shape(cfg, num_devices), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ------------------------------------------------------------------------------------------
# Logical names -> shardings.


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drops, per dimension, trailing mesh axes until their product divides the dimension."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...],
                   shape: tuple[int, ...]) -> NamedSharding:
  """The sharding `RULES` give an array of `shape` whose dimensions have these logical names."""
  spec = nn.logical_to_mesh_axes(logical_axes, RULES)
  return NamedSharding(mesh, _fit(spec, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(tree, mesh: Mesh):
  """Shardings for a pytree whose leaves may be boxed with logical names (`nn.LogicallyPartitioned`,
  what `model.init` returns, abstract or not); the result has the unboxed tree's structure and
  unnamed leaves are replicated."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return named_sharding(mesh, leaf.names, leaf.value.shape)
    return replicated(mesh)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(model: nn.Module, seq_len: int):
  """The model's parameters as boxed `ShapeDtypeStruct`s: shapes and logical names, no memory."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), np.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def state_shardings(abstract_state, boxed_params, optimizer, mesh: Mesh):
  """Shardings for a train state with `params` and `opt_state` fields: the optimizer state takes
  its parameters' names (optax maps over the boxes), everything else is replicated."""
  opt_state = jax.eval_shape(optimizer.init, boxed_params)
  return jax.tree.map(lambda _: replicated(mesh), abstract_state).replace(
      params=logical_shardings(boxed_params, mesh),
      opt_state=logical_shardings(opt_state, mesh))


def create_sharded(init_fn: Callable[[], Any], shardings):
  """Runs `init_fn` under jit with `shardings` as outputs: every device materialises only its
  own shards, so no device ever holds a full copy."""
  return jax.jit(init_fn, out_shardings=shardings)()


def with_shardings(abstract_tree, shardings):
  """`ShapeDtypeStruct`s carrying shardings: what orbax restores onto (any mesh shape)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


# ------------------------------------------------------------------------------------------
# Batches and caches.


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Token batches `[B, T]`: the batch split over `data` and `fsdp`."""
  return named_sharding(mesh, ("batch", "length"), shape)


def global_batch(local_BxT: np.ndarray, mesh: Mesh) -> jax.Array:
  """One global array from every process's own rows (what its grain shard produced)."""
  shape = (local_BxT.shape[0] * jax.process_count(), *local_BxT.shape[1:])
  return jax.make_array_from_process_local_data(batch_sharding(mesh, shape), local_BxT, shape)


def cache_shardings(cache, mesh: Mesh):
  """Any cache pytree: K/V buffers (a `k` / `v` leaf, or a leaf of a storage's buffer pytree
  there, such as codes and scales) by batch and KV heads, other leaves by batch."""
  def one(path, leaf):
    kv = any(getattr(p, "name", None) in ("k", "v") for p in path[-2:])
    if kv and leaf.ndim in (len(KV_BUFFER_AXES), len(KV_STACK_AXES)):
      axes = KV_BUFFER_AXES if leaf.ndim == len(KV_BUFFER_AXES) else KV_STACK_AXES
      return named_sharding(mesh, axes, leaf.shape)
    axes = ("cache_batch",) + (None,) * (leaf.ndim - 1) if leaf.ndim else ()
    return named_sharding(mesh, axes, leaf.shape)
  return jax.tree_util.tree_map_with_path(one, cache)


# ------------------------------------------------------------------------------------------
# The jitted train step.


def shard_step(step: Callable, mesh: Mesh, state_sharding, batch_shape: tuple[int, ...]):
  """`step(state, tokens) -> (state, metrics)` jitted with explicit in/out shardings and the
  state donated; XLA propagates the shardings through the activations."""
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh, batch_shape)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


# ------------------------------------------------------------------------------------------
# Memory per device.


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds for a tree of shapes placed by `shardings` (analytic: no arrays)."""
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def device_bytes(tree, device) -> int:
  """Bytes the arrays of `tree` really hold on `device`."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)
