"""Calibration data the paper's way: long inputs, responses the model itself generates for them,
and loss only on those responses.

`reading_set` (long-range, the default): a reading-comprehension passage sits early in a long
context of other passages and its question comes last, so the response must quote a fact, name
or number from far back. The model's own answers are kept only where they quote a gold answer:
those responses depend on the distant passage, which is what profiling must see. A question the
model gets wrong even with the passage alone (a short prompt, cheap) is skipped before the long
prompt is tried.

`calibration_set` (the earlier recipe): a chat model is asked to summarise a corpus passage; a
base model simply continues it.

Every sample is exactly `length` tokens: the prompt fills `length - response_tokens`, the greedy
response (dense attention) follows, and a short response leaves unscored padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from kvjax.decode import generate, init_cache
from kvjax.eval.reading import Reading, answered

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


def split_by_passage(items: Sequence[Reading], every: int = 5) -> tuple[list[Reading],
                                                                        list[Reading]]:
  """`(train, validation)`: every `every`-th distinct passage (in sorted order) and all its
  questions go to validation, so that no validation answer was read while profiling."""
  passages = {p: i for i, p in enumerate(sorted({x.passage for x in items}))}
  held = [passages[x.passage] % every == 0 for x in items]
  return ([x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h])


_FIRST = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines",
          "Jonas", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa",
          "Stefan", "Tariq")
_LAST = ("Abbott", "Brennan", "Castillo", "Dufresne", "Eriksen", "Fontaine", "Galloway",
         "Hartmann", "Ibarra", "Jansen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor",
         "Petrov", "Quinlan", "Rinaldi", "Sandoval", "Takahashi")
_FACTS = {
    "home town": ("Lisbon", "Krakow", "Nairobi", "Osaka", "Quito", "Tallinn", "Adelaide",
                  "Marseille", "Winnipeg", "Porto", "Dresden", "Cusco"),
    "employer": ("Harbor Freight Lines", "Silverleaf Bakery", "Northwind Mills", "Bluegate Labs",
                 "Orchard Press", "Redstone Mining", "Clearwater Hotels", "Ironbridge Motors"),
    "favourite colour": ("teal", "crimson", "ochre", "lavender", "olive", "amber", "navy",
                         "coral"),
    "dog's name": ("Biscuit", "Pepper", "Maple", "Rocket", "Juniper", "Waffles", "Nugget",
                   "Clover"),
}


def fact_items(rng: np.random.Generator, count: int) -> list[Reading]:
  """`count` synthetic notes of three facts about three people (a number, a city, a company, a
  colour or a name), each with a question about one of them: a long-range question whose answer
  is a quote, in another format than the pass key's."""
  items = []
  for _ in range(count):
    people = [f"{_FIRST[i]} {_LAST[j]}" for i, j in zip(rng.choice(len(_FIRST), 3, replace=False),
                                                        rng.choice(len(_LAST), 3, replace=False))]
    facts = []
    for person, kind in zip(people, rng.choice(["locker number", *_FACTS], 3, replace=False)):
      value = (str(int(rng.integers(100, 10_000))) if kind == "locker number"
               else str(rng.choice(_FACTS[kind])))
      facts.append((person, str(kind), value))
    note = " ".join(f"{p}'s {kind} is {value}." for p, kind, value in facts)
    p, kind, value = facts[int(rng.integers(3))]
    items.append(Reading(note, f"What is {p}'s {kind}?", (value,), "facts", f"{p}'s {kind} is"))
  return items


SHORT = 512  # the width of passage-only prompts (one compilation for all of them)


@dataclasses.dataclass
class ReadingStats:
  """How many questions were tried and answered, with the passage alone and in a long context."""

  short_tried: int = 0
  short_answered: int = 0
  long_tried: int = 0
  long_answered: int = 0


def _ids(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def _bos(tokenizer) -> np.ndarray:
  return np.asarray([tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else [], np.int32)


def _passage(tokenizer, item: Reading) -> np.ndarray:
  return _ids(tokenizer, f"Passage: {item.passage}\n\n")


def _question(tokenizer, item: Reading) -> np.ndarray:
  lead = f" {item.lead}" if item.lead else ""
  return _ids(tokenizer, f"\n\nQuestion: {item.question}\nAnswer:{lead}")


def reading_prompt(tokenizer, target: Reading, fillers: Sequence[Reading], *, width: int,
                   depth: float) -> np.ndarray | None:
  """Exactly `width` tokens: other passages around the target passage, which starts `depth` of
  the way into the passages, then the target's question. Passages are encoded one by one and the
  outermost ones cut to fit. None when the target and its question alone do not fit."""
  bos, target_ids, question = _bos(tokenizer), _passage(tokenizer, target), _question(tokenizer,
                                                                                      target)
  room = width - len(bos) - len(target_ids) - len(question)
  if room < 0:
    return None
  before_n = round(depth * room)
  pieces = iter(fillers)

  def fill(n: int) -> np.ndarray:
    parts, got = [], 0
    while got < n:
      parts.append(_passage(tokenizer, next(pieces)))
      got += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  before = fill(before_n)[-before_n:] if before_n else np.zeros(0, np.int32)
  after = fill(room - before_n)[:room - before_n]
  return np.concatenate([bos, before, target_ids, after, question])


def _respond(model, params, cfg, tokenizer, prompt_T: np.ndarray, width: int,
             response_tokens: int) -> np.ndarray:
  """The greedy response (dense) up to EOS or its first line break, to a prompt right-padded to
  `width`."""
  prompt_1xW = np.full((1, width), tokenizer.pad_id, np.int32)
  prompt_1xW[0, :len(prompt_T)] = prompt_T
  out = generate(model, params, prompt_1xW, np.array([len(prompt_T)]),
                 max_new_tokens=response_tokens, rng=jax.random.key(0),
                 cache=init_cache(cfg, 1, width + response_tokens), eos_id=tokenizer.eos_id,
                 pad_id=tokenizer.pad_id)
  tokens, n = (np.asarray(x)[0] for x in jax.device_get((out.tokens, out.lengths)))
  text = [tokenizer.decode([t]) for t in tokens[:n]]
  start = next((i for i, t in enumerate(text) if t.strip()), n)
  end = next((i for i in range(start, n) if "\n" in text[i]), n)
  return tokens[start:end]


def reading_set(model, params, cfg, tokenizer, items: Sequence[Reading], *, length: int,
                count: int, response_tokens: int, rng: np.random.Generator,
                fillers: Sequence[Reading] | None = None, check_short: bool = True,
                max_long_tries: int | None = None, short_answers: dict | None = None,
                log: Callable[[str], None] = lambda line: None):
  """`(tokens [count, length], weights [count, length], stats)` of long-range questions the model
  answers right (weight 1 on its answer). Targets are drawn from `items` in a random order; the
  other passages are random `fillers` (default: `items`) with other passages. Raises ValueError
  when fewer than `count` are answered within `max_long_tries` long prompts (default 16 x count)
  or the items run out. `check_short` first asks with the passage alone and skips what the model
  gets wrong there; `short_answers` (item -> answered) carries that check from one call to the
  next; `log` hears of every accepted sample.

  `model`/`cfg` must be the dense model (responses come from the unmodified model).
  """
  width = length - response_tokens
  stats, tokens, weights = ReadingStats(), [], []
  short_answers = {} if short_answers is None else short_answers
  for i in rng.permutation(len(items)):
    if len(tokens) == count or stats.long_tried == (max_long_tries or 16 * count):
      break
    target = items[i]
    short = np.concatenate([_bos(tokenizer), _passage(tokenizer, target),
                            _question(tokenizer, target)])
    if len(short) > SHORT:
      continue
    stats.short_tried += 1
    if not check_short:
      short_answers[target] = True
    if target not in short_answers:
      said = _respond(model, params, cfg, tokenizer, short, SHORT, response_tokens)
      short_answers[target] = answered(tokenizer.decode(said), target.answers)
    if not short_answers[target]:
      continue
    stats.short_answered += 1
    pool = items if fillers is None else fillers
    others = [pool[j] for j in rng.permutation(len(pool))[:64]
              if pool[j].passage != target.passage]
    prompt = reading_prompt(tokenizer, target, others, width=width,
                            depth=float(rng.uniform(0.0, 0.5)))
    if prompt is None:
      continue
    stats.long_tried += 1
    said = _respond(model, params, cfg, tokenizer, prompt, width, response_tokens)
    if not len(said) or not answered(tokenizer.decode(said), target.answers):
      continue
    stats.long_answered += 1
    row = np.full(length, tokenizer.pad_id, np.int32)
    row[:width], row[width:width + len(said)] = prompt, said
    tokens.append(row)
    weights.append((np.arange(length) >= width) & (np.arange(length) < width + len(said)))
    log(f"{length} tokens: {len(tokens)} of {count} ({stats})")
  if len(tokens) < count:
    raise ValueError(f"the model answered {len(tokens)} of the {count} long-range questions "
                     f"wanted at {length} tokens ({stats})")
  return np.stack(tokens), np.stack(weights).astype(np.int32), stats
