"""Training on top of a base model: `train.base` (a kvjax training workdir) or `model.weights`
(a pretrained checkpoint) supplies the parameters the model shares with it.

Without `train.freeze_base` the base only initialises those parameters and everything trains.
With it, only the parameters the base lacks (an attention gate's) are trained and checkpointed,
with LoRA adapters on the base's kernels if `train.lora_rank` is set; the base stays frozen and
is found again through the run's config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import traverse_util

from kvjax.config import ConfigError, ModelConfig, TrainConfig, load_config
from kvjax.gate.layer import is_gate_param
from kvjax.training.lora import LORA, apply_lora


def base_model_config(cfg: ModelConfig) -> ModelConfig:
  """The model a pretrained checkpoint holds: `cfg` without its attention gate."""
  return dataclasses.replace(cfg, attention_gate=dataclasses.replace(cfg.attention_gate,
                                                                     enable=False))


def load_base(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """The base's parameters, or None when the run starts from scratch."""
  if train_cfg.base:
    from kvjax.training.checkpoint import CONFIG_FILE, restore_params  # noqa: PLC0415 (a cycle)
    config_file = Path(train_cfg.base) / CONFIG_FILE
    if not config_file.is_file():
      raise ConfigError(f"train.base: {train_cfg.base} holds no training run (no {CONFIG_FILE})")
    return restore_params(train_cfg.base, load_config(config_file))
  if model_cfg.weights:
    from kvjax.io import load_weights  # noqa: PLC0415 (heavy; only for pretrained bases)
    return load_weights(base_model_config(model_cfg))
  return None


def merge_params(base, params):
  """`params` with every entry of `base` put in (or added where `params` lacks it)."""
  if base is None:
    return params
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(base))
  return traverse_util.unflatten_dict(flat)


def model_params(frozen, trained, lora_scale: float):
  """What the model applies: the `trained` entries with the `frozen` base, whose kernels carry
  the trained LoRA adapters (if any)."""
  adapters = trained.get(LORA)
  params = merge_params(frozen, {k: v for k, v in trained.items() if k != LORA})
  return params if adapters is None else apply_lora(params, adapters, lora_scale)


def split_params(params, base):
  """`(trained, frozen)`: the entries `base` lacks, and `base` itself, after checking that every
  base entry has the model's shape and that the base lacks only attention-gate entries."""
  flat = traverse_util.flatten_dict(params)
  wrong = [f"{'/'.join(path)}: {getattr(leaf, 'shape', None)} in the base, "
           f"{getattr(flat.get(path), 'shape', 'absent')} in the model"
           for path, leaf in traverse_util.flatten_dict(base).items()
           if getattr(flat.get(path), "shape", None) != leaf.shape]
  if wrong:
    raise ConfigError(f"the base model does not fit this model: {'; '.join(wrong[:3])}")
  base_paths = traverse_util.flatten_dict(base).keys()
  trained = {path: leaf for path, leaf in flat.items() if path not in base_paths}
  missing = sorted("/".join(path) for path in trained if not is_gate_param(path))
  if missing:
    raise ConfigError(f"the base lacks {len(missing)} parameter(s) of this model that are not "
                      f"attention-gate ones (only those are initialised): {', '.join(missing[:3])}")
  return traverse_util.unflatten_dict(trained), base
