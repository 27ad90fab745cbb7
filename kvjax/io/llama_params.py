"""Llama checkpoints (HF names, HF layout) -> kvjax ModelConfig fields and a params pytree.

The target tree is whatever `build_model(cfg).init` would create (found with `jax.eval_shape`),
so the loaded params always match the model; every leaf must come from the checkpoint, except
what the model's methods add (an attention gate's: a Llama checkpoint has none, they are freshly
initialised), and every checkpoint tensor must land somewhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import registry
from kvjax.config import ModelConfig, from_dict
from kvjax.errors import CheckpointError, ConfigError
from kvjax.models import build_model
from kvjax.models.llama import stack_layers

# ModelConfig fields a checkpoint fixes; `max_seq_len` is the trained context, a default only.
ARCH_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings")

_GLOBAL = {("embed", "table", "embedding"): "model.embed_tokens.weight",
           ("embed", "head", "kernel"): "lm_head.weight",
           ("final_norm", "scale"): "model.norm.weight"}
_LAYER = {("attn_norm", "scale"): "input_layernorm", ("mlp_norm", "scale"): "post_attention_layernorm",
          ("attn", "q", "kernel"): "self_attn.q_proj", ("attn", "kv", "k", "kernel"): "self_attn.k_proj",
          ("attn", "kv", "v", "kernel"): "self_attn.v_proj", ("attn", "o", "kernel"): "self_attn.o_proj",
          ("mlp", "gate", "kernel"): "mlp.gate_proj", ("mlp", "up", "kernel"): "mlp.up_proj",
          ("mlp", "down", "kernel"): "mlp.down_proj"}


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def config_from_arch(arch: dict[str, Any], base: ModelConfig, weights: str) -> ModelConfig:
  """`base` with every checkpoint-fixed field (and the trained context length) replaced, each
  checked like a config value (a damaged file may hold any type, any number)."""
  values = {**dataclasses.asdict(base), "kind": "llama", "weights": weights, **arch}
  try:
    return from_dict(ModelConfig, values, prefix="model")
  except ConfigError as e:
    raise CheckpointError(f"{weights}: the checkpoint's architecture is not a valid model "
                          f"({e})") from None


def check_config(cfg: ModelConfig, arch: dict[str, Any], where: str) -> None:
  """Raises one ConfigError listing every field where `cfg` disagrees with the checkpoint."""
  def same(name):
    got = cfg.head_dim_ if name == "head_dim" else getattr(cfg, name)
    if isinstance(arch[name], float):
      return math.isclose(got, arch[name], rel_tol=1e-6)
    return got == arch[name]

  wrong = [f"model.{n}={getattr(cfg, n)!r} but the checkpoint has {arch[n]!r}"
           for n in ARCH_FIELDS if not same(n)]
  if cfg.kind != "llama":
    wrong.insert(0, f"model.kind={cfg.kind!r} but the checkpoint is a llama model")
  if wrong:
    raise ConfigError(f"model.weights={where}: the config disagrees with the checkpoint: "
                      f"{'; '.join(wrong)}")


def _hf_name(path: tuple[str, ...]) -> str:
  if path in _GLOBAL:
    return _GLOBAL[path]
  if path[0].startswith("layer_") and path[1:] in _LAYER:
    return f"model.layers.{path[0].removeprefix('layer_')}.{_LAYER[path[1:]]}.weight"
  raise CheckpointError(f"kvjax parameter {'/'.join(path)} has no counterpart in a Llama "
                        f"checkpoint")


def _initialised_additions(cfg: ModelConfig, tokens, paths) -> dict[tuple[str, ...], jax.Array]:
  """The leaves of a fresh `build_model(cfg)` that `cfg`'s methods add to a Llama model (an
  attention gate's) and no checkpoint holds; the jitted init computes only those."""
  added = [path for path in paths if registry.is_added_param(cfg, path)]
  if not added:
    return {}

  def init():
    params = nn.unbox(build_model(cfg).init(jax.random.key(0), tokens)["params"])
    flat = flax.traverse_util.flatten_dict(params)
    return {path: flat[path] for path in added}
  return jax.jit(init)()


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str):
  """Maps HF-named `[out, in]` tensors onto the params tree of `build_model(cfg)`; what the
  model's methods add (attention gates) is initialised."""
  if cfg.scan_layers:  # checkpoints name layers one by one: fill the unrolled tree, then stack
    unrolled = params_from_tensors(tensors, dataclasses.replace(cfg, scan_layers=False), where)
    return stack_layers(unrolled, cfg)
  layers = sorted({int(m[1]) for name in tensors if (m := _LAYER_NAME.match(name))})
  if layers != list(range(cfg.num_layers)):  # checked before a model of that depth is built
    found = f"layers {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "no layers"
    raise CheckpointError(f"{where}: holds tensors of {found}, the model has "
                          f"model.num_layers={cfg.num_layers}")
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), tokens))["params"]
  flat = flax.traverse_util.flatten_dict(abstract)
  unused = set(tensors) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
  out = _initialised_additions(cfg, tokens, flat)
  for path, leaf in flat.items():
    if path in out:
      continue
    leaf = getattr(leaf, "value", leaf)  # nn.Partitioned boxes from logical partitioning
    name = _hf_name(path)
    if name not in tensors:
      raise CheckpointError(f"{where}: tensor {name} is missing (needed for {'/'.join(path)})")
    w = tensors[name]
    if path[-1] == "kernel":  # HF Linear stores [out, in]; kvjax kernels are [in, ...out]
      w = w.T
    if w.size != math.prod(leaf.shape):
      raise CheckpointError(f"{where}: tensor {name} has shape {tensors[name].shape}, which does "
                            f"not fit {'/'.join(path)} of shape {leaf.shape}")
    out[path] = jnp.asarray(w.reshape(leaf.shape), leaf.dtype)
    unused.discard(name)
  if unused:
    raise CheckpointError(f"{where}: tensors with no place in this model: "
                          f"{', '.join(sorted(unused)[:5])}")
  return flax.traverse_util.unflatten_dict(out)
