"""Text samples from a model in training, through the library's own decode loop."""

from __future__ import annotations

import jax
import numpy as np

from kvjax.config import Config
from kvjax.data.tokenizers import Tokenizer, encode_prompt
from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.errors import ConfigError


def sample_prompt_ids(cfg: Config, tokenizer: Tokenizer) -> np.ndarray:
  """`train.sample_prompt` as ids (`encode_prompt`: an empty one starts a document)."""
  try:
    ids = encode_prompt(tokenizer, cfg.train.sample_prompt)
  except ValueError as e:
    raise ConfigError(f"train.sample_prompt: {e}") from None
  if cfg.train.sample_tokens and len(ids) >= cfg.model.max_seq_len:
    raise ConfigError(f"train.sample_prompt: {len(ids)} tokens leave no room to generate within "
                      f"model.max_seq_len={cfg.model.max_seq_len}")
  return ids


def generate_samples(model, params, cfg: Config, tokenizer: Tokenizer, prompt_ids: np.ndarray,
                     rng: jax.Array) -> list[str]:
  """`train.num_samples` continuations of the prompt, each as prompt + generated text."""
  n, prompt_len = cfg.train.num_samples, len(prompt_ids)
  new_tokens = min(cfg.train.sample_tokens, cfg.model.max_seq_len - prompt_len)
  out = generate(model, params, np.tile(prompt_ids, (n, 1)), np.full((n,), prompt_len),
                 max_new_tokens=new_tokens, rng=rng,
                 cache=init_cache(cfg.model, batch=n, max_len=prompt_len + new_tokens),
                 sampling=SamplingConfig(temperature=cfg.train.sample_temperature),
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tokens, lengths = jax.device_get((out.tokens, out.lengths))
  return [cfg.train.sample_prompt + tokenizer.decode(t[:k]) for t, k in zip(tokens, lengths)]
