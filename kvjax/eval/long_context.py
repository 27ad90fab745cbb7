"""Run the synthetic long-context tasks on a model and report accuracy by length and depth.

Retrieval tasks either generate greedily with the cache that `kvjax.decode.init_cache` builds
for the model's config (`kvjax.decode.generate` with chunked prefill), so a compressed cache is
scored as it decodes, or teacher-force the answer after the prompt through a scorer (one forward
pass, no decode loop to compile): a sample counts when every answer token is the model's argmax,
what greedy decoding would produce. Associative recall is teacher-forced the same way. Every
sample's result is kept (`records`), so that methods run on the same seeded samples can be
compared pairwise.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from kvjax.config import ModelConfig
from kvjax.data.tokenizers import encode_prompt
from kvjax.decode import generate, init_cache
from kvjax.eval.scoring import LogitsFn, score_spans
from kvjax.eval.synthetic import RecallSample, Sample

_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
  m = _NUMBER.search(text)
  return m.group(0) if m else None


def _pad_to(n: int, multiple: int = 256) -> int:
  return -(-n // multiple) * multiple


def generate_answers(model: nn.Module, params, cfg: ModelConfig, tokenizer,
                     prompts: Sequence[str], *, max_new_tokens: int = 12, batch_size: int = 1,
                     chunk: int = 256) -> list[str]:
  """Greedy continuations of `prompts`, batched and right-padded to multiples of 256 tokens
  (fewer compilations) where the model's context allows."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
  encoded = [np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(p)]) for p in prompts]
  outputs = [""] * len(prompts)
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
  for start in range(0, len(order), batch_size):
    group = order[start:start + batch_size]
    longest = max(len(encoded[i]) for i in group)
    width = max(longest, min(_pad_to(longest), cfg.max_seq_len - max_new_tokens))
    tokens_BxT = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    lengths_B = np.ones(batch_size, np.int32)  # unused rows: one pad token
    for r, i in enumerate(group):
      tokens_BxT[r, :len(encoded[i])] = encoded[i]
      lengths_B[r] = len(encoded[i])
    cache = init_cache(cfg, batch_size, min(cfg.max_seq_len, width + max_new_tokens))
    out = generate(model, params, tokens_BxT, lengths_B, max_new_tokens=max_new_tokens,
                   rng=jax.random.key(0), cache=cache, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, chunk=chunk)
    tokens, lengths = jax.device_get((out.tokens, out.lengths))
    for r, i in enumerate(group):
      outputs[i] = tokenizer.decode(tokens[r, :lengths[r]])
  return outputs


def answer_sequence(tokenizer, sample: Sample) -> tuple[np.ndarray, tuple[int, int]]:
  """The prompt as generation reads it, then the answer (after a space); and the answer's span."""
  prompt = encode_prompt(tokenizer, sample.prompt)
  answer = tokenizer.encode(f" {sample.answer}")
  return (np.concatenate([prompt, answer]).astype(np.int32),
          (len(prompt), len(prompt) + len(answer)))


def _table(keys, correct) -> dict:
  """{"1024": {"accuracy": a, "n": n}, ...} for each distinct key, in sorted order."""
  groups = defaultdict(list)
  for k, c in zip(keys, correct):
    groups[k].append(c)
  return {str(k): {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def retrieval_accuracy(samples: Sequence[Sample], correct: Sequence[bool],
                       outputs: Sequence[str] | None = None) -> dict:
  """Accuracy overall, by length, depth and both, and every sample's record in order."""
  correct = [bool(c) for c in correct]
  records = [{"length": s.length, "depth": s.depth, "answer": s.answer, "correct": c}
             for s, c in zip(samples, correct)]
  for r, o in zip(records, outputs or ()):
    r["output"] = o
  return {"accuracy": float(np.mean(correct)), "n": len(correct),
          "by_length": _table([s.length for s in samples], correct),
          "by_depth": _table([s.depth for s in samples], correct),
          "by_length_and_depth": _table([f"{s.length}@{s.depth:g}" for s in samples], correct),
          "records": records}


def evaluate_retrieval(model: nn.Module, params, cfg: ModelConfig, tokenizer,
                       samples: Sequence[Sample], *, batch_size: int = 1) -> dict:
  """Greedy generation: correct when the first number in the output is the answer."""
  outputs = generate_answers(model, params, cfg, tokenizer, [s.prompt for s in samples],
                             batch_size=batch_size)
  return retrieval_accuracy(samples, [first_number(o) == s.answer
                                      for s, o in zip(samples, outputs)], outputs)


def score_retrieval(logits_fn: LogitsFn, tokenizer, samples: Sequence[Sample]) -> dict:
  """Teacher-forced: correct when every token of the answer is the argmax after the prompt.
  One sequence per call (long sequences gain nothing from batching on a CPU), padded to a
  multiple of 16 tokens: samples of one length share a width, and a plan sized by the sequence's
  length (MoA) sees about the length that generation's cache is sized for."""
  sequences, spans = zip(*(answer_sequence(tokenizer, s) for s in samples))
  scores = score_spans(logits_fn, sequences, [[span] for span in spans],
                       pad_id=tokenizer.pad_id, batch_tokens=1, step=16)
  return retrieval_accuracy(samples, [x.greedy for (x,) in scores])


def evaluate_recall(logits_fn: LogitsFn, tokenizer, samples: Sequence[RecallSample], *,
                    batch_tokens: int = 8192) -> dict:
  """Teacher-forced multi-query recall: accuracy over queries, by context length."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
  sequences, spans = [], []
  for s in samples:
    parts, sample_spans = [np.asarray(bos, np.int32), tokenizer.encode(s.context)], []
    n = sum(len(p) for p in parts)
    for query, answer in zip(s.queries, s.answers):
      q, a = tokenizer.encode(query), tokenizer.encode(answer)
      sample_spans.append((n + len(q), n + len(q) + len(a)))
      parts += [q, a]
      n += len(q) + len(a)
    sequences.append(np.concatenate(parts))
    spans.append(sample_spans)
  scores = score_spans(logits_fn, sequences, spans, pad_id=tokenizer.pad_id,
                       batch_tokens=batch_tokens)
  lengths = [s.length for s, per in zip(samples, scores) for _ in per]
  correct = [x.greedy for per in scores for x in per]
  return {"accuracy": float(np.mean(correct)), "n": len(correct),
          "by_length": _table(lengths, correct)}
