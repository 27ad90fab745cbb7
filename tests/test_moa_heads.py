"""Retrieval heads and the hand-made plan, checked against NumPy and by hand; the long-range
calibration prompts; the CLI's one-line errors."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.data.tokenizers import ByteTokenizer
from kvjax.eval.reading import Reading, answered, normalize, quoted
from kvjax.layers.cache import Chunk
from kvjax.moa.__main__ import main as moa_main
from kvjax.moa.calibration import fact_items, reading_prompt, split_by_passage
from kvjax.moa.heads import SpanAttention, keep_heads_plan, planted_span, span_attention
from kvjax.moa.plan import Plan
from tests.helpers import TINY, random_tokens, tiny_model

TINY_YAML = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def test_span_attention_mass_equals_a_numpy_softmax():
  b, t, h, k, d = 2, 7, 4, 2, 8
  rng = np.random.default_rng(0)
  q, kk, v = (rng.normal(size=s).astype(np.float32) for s in ((b, t, h, d), (b, t, k, d),
                                                              (b, t, k, d)))
  keys = (rng.random((b, t)) < 0.4).astype(np.float32)
  queries = np.zeros((b, t), np.float32)
  queries[:, 4:6] = 1
  layout = SpanAttention(jnp.asarray(keys), jnp.asarray(queries), jnp.zeros((b, h)))
  out, got = layout.attend(jnp.asarray(q), Chunk(jnp.asarray(kk), jnp.asarray(v),
                                                 jnp.zeros((b, t), jnp.int32)))
  kh, vh = np.repeat(kk, h // k, axis=2), np.repeat(v, h // k, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(d)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bs,bt->bh", p, keys, queries) / queries.sum(1)[:, None]
  np.testing.assert_allclose(got.mass_BxH, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p, vh), rtol=1e-5, atol=1e-5)


def test_every_head_puts_all_its_attention_on_a_span_that_is_every_token():
  cfg, model, params = tiny_model()
  tokens = random_tokens(1, 16)
  ones = jnp.ones((1, 16))
  mass = span_attention(model, params, tokens, ones, ones)
  assert mass.shape == (cfg.model.num_layers, 1, cfg.model.num_heads)
  np.testing.assert_allclose(mass, 1.0, rtol=1e-5)


def test_planted_span_finds_every_occurrence_and_the_predicting_queries():
  seq = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 0, 1, 2, 3])  # answer (1, 2, 3) at 10..13
  keys, queries = planted_span(seq, (10, 13))
  np.testing.assert_array_equal(np.flatnonzero(keys), [1, 2, 3, 5, 6, 7])
  np.testing.assert_array_equal(np.flatnonzero(queries), [9, 10, 11])
  # a leading token the prompt spells differently (a space) is dropped until the rest occurs
  keys, _ = planted_span(np.array([4, 2, 3, 8, 6, 2, 3]), (4, 7))
  np.testing.assert_array_equal(np.flatnonzero(keys), [1, 2])
  with pytest.raises(ValueError, match="nothing is planted"):
    planted_span(np.array([1, 2, 3, 4, 5]), (3, 5))


def test_keep_heads_plan_by_hand():
  # 2 layers x 4 query heads, 2 K/V heads (groups {0, 1}, {2, 3}); keep layer 1's head 3.
  plan = keep_heads_plan([(1, 3)], num_layers=2, num_heads=4, num_kv_heads=2, budget=0.5,
                         lengths=[256], block=16)
  assert plan.betas[1][2:] == (1.0, 1.0) and plan.alphas == ((0.0,) * 4,) * 2
  beta = plan.betas[0][0]
  assert set(plan.betas[0]) | set(plan.betas[1][:2]) == {beta}
  # three K/V heads at ceil(beta * 256 / 16) * 16 slots and one at 256: at most half of 4 x 256
  assert 3 * -(-int(beta * 256) // 16) * 16 + 256 <= 512
  assert 3 * -(-int((beta + 1 / 256) * 256) // 16) * 16 + 256 > 512
  assert plan.kv_density(256, 16, 2) <= 0.5
  with pytest.raises(ValueError, match="2 full K/V heads of 4 leave no window"):
    keep_heads_plan([(0, 0), (1, 0)], num_layers=2, num_heads=4, num_kv_heads=2, budget=0.5,
                    lengths=[256], block=16)


def test_kv_density_counts_the_largest_query_head_of_each_group():
  # one layer, 4 query heads over 2 K/V heads; at n = 128, block 32: sizes 128, 64 | 64, 64
  plan = Plan(alphas=((0.0,) * 4,), betas=((1.0, 0.5, 0.5, 0.25),))
  np.testing.assert_array_equal(plan.cache_sizes(128, 32), [[128, 64, 64, 64]])
  assert plan.kv_density(128, 32, 2) == (128 + 64) / (2 * 128)


def test_reading_answers_are_quoted_and_normalised():
  item = Reading("The Treaty of Paris was signed in 1783 by the Crown.", "When?",
                 ("1783", "eleven"), "squad")
  assert quoted(item).answers == ("1783",)
  assert quoted(Reading("No numbers here.", "?", ("12",), "drop")) is None
  assert normalize("The  Crown!") == "crown"
  assert answered(" It was 1783.", ["1783"]) and not answered("17834", ["1783"])


def test_split_by_passage_keeps_each_passage_on_one_side():
  items = [Reading(f"passage {i % 7}", f"q{i}", ("a",), "squad") for i in range(40)]
  train, val = split_by_passage(items)
  assert len(train) + len(val) == 40 and val
  assert not {x.passage for x in train} & {x.passage for x in val}


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_reading_prompt_has_the_width_the_passage_at_its_depth_and_the_question_last(depth):
  tok = ByteTokenizer()
  target = Reading("TARGET FACT", "What fact?", ("fact",), "squad")
  fillers = [Reading(f"filler {i} " * 5, "?", ("x",), "squad") for i in range(50)]
  prompt = reading_prompt(tok, target, fillers, width=600, depth=depth)
  text = tok.decode(prompt)
  assert len(prompt) == 600 and text.endswith("\n\nQuestion: What fact?\nAnswer:")
  at = text.index("Passage: TARGET FACT") / (len(text) - len("\n\nQuestion: What fact?\nAnswer:"))
  assert abs(at - depth) < 0.06
  assert reading_prompt(tok, target, fillers, width=20, depth=0.5) is None


def test_heads_plan_cli_writes_a_plan_within_the_density(tmp_path, capsys):
  heads = tmp_path / "heads.json"
  mass = np.zeros((2, 4))
  mass[1, 3] = 0.8
  heads.write_text(json.dumps({"mass": mass.tolist()}))
  out = tmp_path / "plan.json"
  moa_main(["heads-plan", "--config", TINY_YAML, "--heads", str(heads), "--top", "1",
            "--density", "0.5", "--lengths", "64", "--out", str(out), *TINY,
            "model.moa.block_size=8", "model.moa.sink_tokens=4"])
  assert "1 of 4 K/V heads full" in capsys.readouterr().out
  plan = json.loads(out.read_text())
  assert plan["betas"][1][2:] == [1.0, 1.0]


@pytest.mark.parametrize("argv, message", [
    (["heads-plan", "--heads", "/no/such.json", "--out", "x.json"],
     "--heads /no/such.json: no such file"),
    (["heads", "--lengths", "10", "--out", "x.json"], "--lengths must be in"),
    (["heads", "--depths", "1.5", "--lengths", "64", "--out", "x.json", "model.max_seq_len=128"],
     "--depths must be in [0, 1]"),
    (["plan", "--work", TINY_YAML, "--out", "x.json"], "exists and is not a directory"),
])
def test_moa_cli_rejects_bad_arguments_with_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    moa_main([argv[0], "--config", TINY_YAML, *TINY, *argv[1:]])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err



def test_fact_notes_quote_their_answer_and_lead_into_it():
  for item in fact_items(np.random.default_rng(3), 20):
    person = item.question.removeprefix("What is ").split("'s ")[0]
    assert quoted(item) == item and person in item.passage
    assert f"{item.lead} {item.answers[0]}." in item.passage
