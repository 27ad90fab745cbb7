"""LoRA on a frozen base, purely functional: the model never sees the adapters.

Each adapted kernel `W` of shape `[*stack, *in, *out]` (`stack`: the leading layer axis of
scanned layers) gets `A: [*stack, prod(in), r]` (small random) and `B: [*stack, r, prod(out)]`
(zeros, so training starts from the base); the model applies `W + (A @ B) * alpha / r`,
reshaped to `W`'s multi-axis shape. The adapters live in the trained tree under `LORA`, beside
the gates, and are saved with them; the base stays a reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from kvjax.config import ConfigError, TrainConfig

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
