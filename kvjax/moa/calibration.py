"""Calibration data the paper's way: long inputs from the corpus, responses the model itself
generates for them, and loss only on those responses.

A chat model is asked to summarise a corpus passage; a base model simply continues it. Every
sample is exactly `length` tokens: the prompt fills `length - response_tokens`, the greedy
response (dense attention) follows, and a short response leaves unscored padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from kvjax.decode import generate, init_cache

INSTRUCTION = "\n\nSummarize the text above in a few sentences."


def _prompt(tokenizer, passage_ids: np.ndarray) -> np.ndarray:
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": tokenizer.decode(passage_ids) + INSTRUCTION}])
    return np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(text)])
  return np.concatenate([np.asarray(bos, np.int32), passage_ids])


def _passage_prompt(tokenizer, text: str, width: int) -> np.ndarray:
  """A prompt of exactly `width` tokens around a passage cut from `text`."""
  ids = tokenizer.encode(text)
  budget = width - (len(_prompt(tokenizer, ids[:1])) - 1)
  for _ in range(4):  # re-tokenising a decoded cut can shift the count by a few tokens
    prompt = _prompt(tokenizer, ids[:budget])
    if len(prompt) == width:
      return prompt
    budget -= len(prompt) - width
  return prompt[:width] if len(prompt) >= width else np.pad(
      prompt, (width - len(prompt), 0), constant_values=tokenizer.pad_id)


def calibration_set(model, params, cfg, tokenizer, texts: Sequence[str], *, length: int,
                    count: int, response_tokens: int, rng: np.random.Generator):
  """`(tokens [count, length], weights [count, length])`, weight 1 on response tokens.

  `model`/`cfg` must be the dense model (responses come from the unmodified model).
  """
  width = length - response_tokens
  prompts = []
  for _ in range(count):
    doc = texts[int(rng.integers(len(texts)))]
    start = int(rng.integers(0, max(1, len(doc) - 12 * length)))
    prompts.append(_passage_prompt(tokenizer, doc[start:start + 12 * length], width))
  prompts_BxT = np.stack(prompts).astype(np.int32)
  out = generate(model, params, prompts_BxT, np.full(count, width), max_new_tokens=response_tokens,
                 rng=jax.random.key(0), cache=init_cache(cfg, count, length),
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tokens, lengths = (np.array(x) for x in jax.device_get((out.tokens, out.lengths)))
  weights = np.zeros((count, length), np.int32)
  for i, n in enumerate(lengths):
    weights[i, width:width + n] = 1
    tokens[i, n:] = tokenizer.pad_id
  return np.concatenate([prompts_BxT, tokens], axis=1), weights
