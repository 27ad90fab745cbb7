"""A config checked as a whole: what one section cannot know about another. `load_config` is the
loader the library and the command-line tools use (`kvjax.config` parses and checks each section
on its own)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvjax import registry
from kvjax.config import Config, parse_config
from kvjax.data.tokenizers import tokenizer_names, tokenizer_vocab_size
from kvjax.errors import ConfigError


def check_config(cfg: Config) -> Config:
  """`cfg`, once the tokenizer fits the model and the model's methods combine (their files
  read and checked); else one ConfigError naming the keys."""
  names = tokenizer_names()
  if cfg.data.tokenizer not in names:
    raise ConfigError(f"data.tokenizer: got {cfg.data.tokenizer!r}, allowed: {', '.join(names)}")
  need = tokenizer_vocab_size(cfg.data.tokenizer)
  if cfg.model.vocab_size < need:
    raise ConfigError(f"model.vocab_size: must be >= {need} for data.tokenizer="
                      f"{cfg.data.tokenizer!r}, got {cfg.model.vocab_size}")
  registry.validate(cfg.model)
  return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
  """Reads a YAML config (or the defaults, if `path` is None), applies `key=value` overrides and
  checks the whole."""
  return check_config(parse_config(path, overrides))
