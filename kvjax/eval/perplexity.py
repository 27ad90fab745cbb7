"""Perplexity of a model on text: per token, and per byte (comparable across tokenizers)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvjax.eval.scoring import LogitsFn, score_spans


def perplexity(logits_fn: LogitsFn, tokenizer, texts: Sequence[str], *, seq_len: int,
               batch_tokens: int = 4096) -> dict:
  """Scores every token of every text but the first, in windows of `seq_len` tokens.

  Consecutive windows share one token (the last scored token of one is the unscored context
  token of the next). Texts start with BOS when the tokenizer's model expects one; otherwise a
  text's first token goes unscored. Raises ValueError if there is no token to score.
  """
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
  windows = []
  for text in texts:
    ids = np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(text)])
    windows += [ids[s:s + seq_len] for s in range(0, len(ids) - 1, seq_len - 1)]
  if not windows:
    raise ValueError("nothing to score: every text is shorter than 2 tokens")
  scores = score_spans(logits_fn, windows, [[(1, len(w))] for w in windows],
                       pad_id=tokenizer.pad_id, batch_tokens=batch_tokens)
  nll = -sum(s.logprob for (s,) in scores)
  tokens = sum(s.num_tokens for (s,) in scores)
  text_bytes = sum(len(t.encode("utf-8")) for t in texts)
  return {"nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
          "bits_per_byte": nll / math.log(2) / text_bytes, "tokens": tokens, "bytes": text_bytes,
          "windows": len(windows), "seq_len": seq_len}
