"""The parameters of a training run: which are trained, which are a frozen base, and LoRA.

A run trains the whole model, or (`train.freeze_base`) only what the model adds to a base
(`train.base`, a kvjax workdir, or `model.weights`, a pretrained checkpoint): the parameters of
the active methods that add some (an attention gate's, `kvjax.registry.is_added_param`), beside
LoRA adapters on the base's kernels if `train.lora_rank` is set. The trained entries are what
the optimizer sees and what checkpoints hold; the base stays frozen and is found again through
the run's config. Purely functional: the model never sees the adapters, only
`model_params(frozen, trained)`.

This module imports nothing else from `kvjax.training`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from kvjax import registry
from kvjax.config import ModelConfig, TrainConfig
from kvjax.errors import ConfigError


def init_params(model: nn.Module, seq_len: int, rng: jax.Array):
  """Parameters as plain arrays (the logical-partitioning boxes removed)."""
  return nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def merge_params(base, params):
  """`params` with every entry of `base` put in (or added where `params` lacks it)."""
  if base is None:
    return params
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(base))
  return traverse_util.unflatten_dict(flat)


def without_added(params, cfg: ModelConfig):
  """`params` without what `cfg`'s methods add to a base model: what a base checkpoint holds."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: leaf for path, leaf in flat.items()
                                       if not registry.is_added_param(cfg, path)})


def split_params(params, base, cfg: ModelConfig):
  """`(trained, frozen)`: the entries `base` lacks, and `base` itself, after checking that every
  base entry has the model's shape and that the base lacks only what `cfg`'s methods add."""
  flat = traverse_util.flatten_dict(params)
  wrong = [f"{'/'.join(path)}: {getattr(leaf, 'shape', None)} in the base, "
           f"{getattr(flat.get(path), 'shape', 'absent')} in the model"
           for path, leaf in traverse_util.flatten_dict(base).items()
           if getattr(flat.get(path), "shape", None) != leaf.shape]
  if wrong:
    raise ConfigError(f"the base model does not fit this model: {'; '.join(wrong[:3])}")
  base_paths = traverse_util.flatten_dict(base).keys()
  trained = {path: leaf for path, leaf in flat.items() if path not in base_paths}
  missing = sorted("/".join(path) for path in trained if not registry.is_added_param(cfg, path))
  if missing:
    raise ConfigError(f"the base lacks {len(missing)} parameter(s) of this model that no method "
                      f"adds (only those are initialised): {', '.join(missing[:3])}")
  return traverse_util.unflatten_dict(trained), base


def init_trained(model: nn.Module, seq_len: int, rng: jax.Array, base=None,
                 freeze_base: bool = False, lora_rank: int = 0, lora_targets: tuple = ()):
  """The parameters a run trains: the model's; with a `base`, those it has come from it, or
  with `freeze_base` only the others are trained, beside LoRA adapters of rank `lora_rank`."""
  params = init_params(model, seq_len, rng)
  if base is None:
    return params
  if not freeze_base:
    return merge_params(base, params)
  trained = split_params(params, base, model.cfg)[0]
  if lora_rank:
    trained[LORA] = init_lora(base, lora_targets, lora_rank, jax.random.fold_in(rng, 1))
  return trained


def model_params(frozen, trained, lora_scale: float):
  """What the model applies: the `trained` entries with the `frozen` base, whose kernels carry
  the trained LoRA adapters (if any)."""
  adapters = trained.get(LORA)
  params = merge_params(frozen, {k: v for k, v in trained.items() if k != LORA})
  return params if adapters is None else apply_lora(params, adapters, lora_scale)


# ------------------------------------------------------------------------------------------
# LoRA: each adapted kernel `W` of shape `[*stack, *in, *out]` (`stack`: the leading layer axis
# of scanned layers) gets `A: [*stack, prod(in), r]` (small random) and `B: [*stack, r,
# prod(out)]` (zeros, so training starts from the base); the model applies
# `W + (A @ B) * alpha / r`, reshaped to `W`'s multi-axis shape. The adapters live in the trained
# tree under `LORA`, beside what a method adds, and are saved with them.

LORA = "lora"  # the trained tree's entry holding the adapters

# Target -> (the kernel's path suffix, its number of input axes, of output axes).
_KERNELS = {"q": (("attn", "q", "kernel"), 1, 2), "k": (("kv", "k", "kernel"), 1, 2),
            "v": (("kv", "v", "kernel"), 1, 2), "o": (("attn", "o", "kernel"), 2, 1),
            "gate": (("mlp", "gate", "kernel"), 1, 1), "up": (("mlp", "up", "kernel"), 1, 1),
            "down": (("mlp", "down", "kernel"), 1, 1)}


def lora_scale(cfg: TrainConfig) -> float:
  """alpha / r: the adapters' weight (0 without LoRA)."""
  return cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0


def _split(shape: tuple[int, ...], n_in: int, n_out: int) -> tuple[tuple[int, ...], int, int]:
  """`(stack, fan_in, fan_out)` of a kernel shape."""
  stack = len(shape) - n_in - n_out
  return shape[:stack], math.prod(shape[stack:stack + n_in]), math.prod(shape[stack + n_in:])


def _targets(params, targets: tuple[str, ...]) -> dict[tuple[str, ...], tuple[int, int]]:
  """The adapted kernels' paths in `params`, each with its (input, output) axis counts."""
  found = {}
  for path in traverse_util.flatten_dict(params):
    for target in targets:
      suffix, n_in, n_out = _KERNELS[target]
      if path[-len(suffix):] == suffix:
        found[path] = (n_in, n_out)
  return found


def init_lora(base, targets: tuple[str, ...], rank: int, rng: jax.Array):
  """Adapters for every `targets` kernel of the frozen `base` (`{path: {"a", "b"}}` nested)."""
  kernels = _targets(base, targets)
  if not kernels:
    raise ConfigError(f"train.lora_targets: the base has none of the kernels {list(targets)}")
  flat = traverse_util.flatten_dict(base)
  adapters = {}
  for i, (path, (n_in, n_out)) in enumerate(sorted(kernels.items())):
    w = flat[path]
    stack, fan_in, fan_out = _split(w.shape, n_in, n_out)
    a = jax.random.normal(jax.random.fold_in(rng, i), (*stack, fan_in, rank), w.dtype)
    adapters[(*path, "a")] = a * fan_in ** -0.5
    adapters[(*path, "b")] = jnp.zeros((*stack, rank, fan_out), w.dtype)
  return traverse_util.unflatten_dict(adapters)


def apply_lora(params, adapters, scale: float):
  """`params` with every adapted kernel replaced by `W + (A @ B) * scale`."""
  flat = traverse_util.flatten_dict(params)
  for path, ab in traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: "a" in x).items():
    w = flat[path]
    flat[path] = w + (scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)
