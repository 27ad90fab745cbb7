"""Seeded long-context tasks: passkey, needle in a haystack, LongEval lines, associative recall.

Every generator builds one sample of about `length` tokens (measured with the tokenizer that
will read it) whose answer sits at relative `depth` (0 = start, 1 = end of the context). The
same seed gives the same samples, so dense and compressed caches see identical inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.")
_PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                   "back again.")
_LINES_INTRO = ("Below is a record of lines I want you to remember. Each line begins with 'line "
                "<line index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a "
                "numerical value. For each line index, memorize its corresponding "
                "<REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the "
                "corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")
_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "do", "fa", "gu", "hi", "ju",
              "be", "zo", "ra", "wi", "ny", "qe")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dublin", "Tbilisi", "Perth",
           "Bergen", "Cusco", "Tallinn", "Accra", "Kyoto", "Porto", "Valletta")


@dataclasses.dataclass(frozen=True)
class Sample:
  prompt: str
  answer: str  # the expected number, as text
  length: int  # requested context length in tokens
  depth: float


@dataclasses.dataclass(frozen=True)
class RecallSample:
  """Teacher-forced recall: `context`, then every query followed by its answer."""

  context: str
  queries: tuple[str, ...]
  answers: tuple[str, ...]
  length: int


def _ntokens(tokenizer, text: str) -> int:
  return len(tokenizer.encode(text))


def _word(rng: np.random.Generator, syllables: int = 3) -> str:
  return "".join(rng.choice(_SYLLABLES, syllables))


def _fill(tokenizer, length: int, fixed: str, unit: str) -> int:
  """How many copies of `unit` bring `fixed` text up to about `length` tokens."""
  return max(1, (length - _ntokens(tokenizer, fixed)) // max(1, _ntokens(tokenizer, unit)))


def passkey(tokenizer, rng: np.random.Generator, length: int, depth: float) -> Sample:
  """A 5-digit pass key said once inside repeated filler (Mohtashami & Jaggi, 2023).

  At depth 1 one filler unit still follows the key: with nothing between them, the needle's
  closing "... is the pass key." runs straight into the question, which then reads as a
  continuation to copy rather than a question about the context.
  """
  key = str(rng.integers(10_000, 100_000))
  needle = f" The pass key is {key}. Remember it. {key} is the pass key."
  question = " What is the pass key? The pass key is"
  n = _fill(tokenizer, length, _PASSKEY_INTRO + needle + question, _PASSKEY_FILLER)
  at = min(round(depth * n), n - 1)
  prompt = (_PASSKEY_INTRO + _PASSKEY_FILLER * at + needle + _PASSKEY_FILLER * (n - at)
            + question)
  return Sample(prompt, key, length, depth)


def needle(tokenizer, rng: np.random.Generator, length: int, depth: float,
           haystack: str) -> Sample:
  """A sentence with a number hidden at a line break of real text (`haystack`)."""
  city, number = rng.choice(_CITIES), str(rng.integers(1_000, 10_000))
  sentence = f"The special magic number for {city} is {number}.\n"
  question = f"\nWhat is the special magic number for {city}? The special magic number for {city} is"
  budget = length - _ntokens(tokenizer, sentence + question)
  chars = min(len(haystack), budget * 8)  # over-long slice, cut to `budget` tokens below
  start = int(rng.integers(0, len(haystack) - chars + 1))
  ids = tokenizer.encode(haystack[start:start + chars])[:budget]
  text = tokenizer.decode(ids)
  cut = round(depth * len(text))
  cut = cut if cut in (0, len(text)) else text.find("\n", cut) + 1 or len(text)
  return Sample(text[:cut] + sentence + text[cut:] + question, number, length, depth)


def lines(tokenizer, rng: np.random.Generator, length: int, depth: float) -> Sample:
  """LongEval line retrieval: `line <word>: REGISTER_CONTENT is <number>` lines, ask for one."""
  line = lambda w, v: f"line {w}: REGISTER_CONTENT is <{v}>\n"
  ask = lambda w: (f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {w}? "
                   f"I need the number.\nAnswer: The <REGISTER_CONTENT> in line {w} is <")
  probe = _word(rng)
  n = _fill(tokenizer, length, _LINES_INTRO + ask(probe), line(probe, 12345))
  words = list(dict.fromkeys(_word(rng) for _ in range(4 * n)))[:n]
  values = rng.integers(10_000, 100_000, len(words))
  # Random words tokenize to more or fewer tokens than the probe: keep the lines that fit.
  room = length - _ntokens(tokenizer, _LINES_INTRO + ask(probe))
  used = np.cumsum([_ntokens(tokenizer, line(w, v)) for w, v in zip(words, values)])
  words = words[:max(1, int(np.searchsorted(used, room, side="right")))]
  target = min(len(words) - 1, round(depth * (len(words) - 1)))
  record = "".join(line(w, v) for w, v in zip(words, values))
  return Sample(_LINES_INTRO + record + ask(words[target]), str(values[target]), length, depth)


def associative_recall(tokenizer, rng: np.random.Generator, length: int,
                       num_queries: int = 16) -> RecallSample:
  """Multi-query associative recall: `key: value` pairs, then queries over random keys."""
  intro = "Remember the number that goes with each word.\n"
  probe = _word(rng)
  n = _fill(tokenizer, length, intro, f"{probe}: 123\n")
  keys = list(dict.fromkeys(_word(rng) for _ in range(4 * n)))[:n]
  values = rng.integers(100, 1000, len(keys))
  context = intro + "".join(f"{k}: {v}\n" for k, v in zip(keys, values)) + "\nRecall:"
  picks = rng.choice(len(keys), min(num_queries, len(keys)), replace=False)
  return RecallSample(context, tuple(f"\n{keys[i]}:" for i in picks),
                      tuple(f" {values[i]}" for i in picks), length)
