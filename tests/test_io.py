"""Checkpoint loaders and tokenizers against HF transformers (torch on CPU) on the same files."""

import dataclasses
import json
import shutil

import flax.traverse_util
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import kvjax
from kvjax import io as kio
from kvjax.errors import ConfigError
from kvjax.io.tokenizer import tokenizer_from_hf_dir

TINY_LLAMA = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                  rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2)
TEXTS = ["Hello world", "  leading spaces and 12345 digits, 3.14159!", "naïve café — 日本語 🙂",
         "tabs\tand\nnewlines\n\n", "<|im_start|>user\nHi<|im_end|>"]


def forward(cfg, params, tokens):
  return np.asarray(kvjax.build_model(cfg).apply({"params": params}, jnp.asarray(tokens)))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_hf(request, tmp_path_factory):
  """A random tiny Llama saved by transformers (config.json + model.safetensors)."""
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=request.param)).eval()
  with torch.no_grad():  # non-unit norm scales, so a misplaced norm changes the logits
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  path = tmp_path_factory.mktemp("tiny_llama")
  ref.save_pretrained(path)
  return path, ref


@pytest.fixture(scope="module")
def smollm2():
  """SmolLM2-135M-Instruct (GGUF, Q4_1), fetched once into the kvjax cache."""
  cfg = kio.model_config_from_checkpoint("smollm2-135m-instruct")
  return cfg, kio.open_checkpoint(cfg.weights).path


@pytest.fixture(scope="module")
def tokenizer(smollm2):
  return kio.load_tokenizer(smollm2[0])


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
  _, path = smollm2
  return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_hf_directory_logits_equal_transformers(tiny_hf):
  path, ref = tiny_hf
  cfg = kio.model_config_from_checkpoint(str(path))
  assert (cfg.num_kv_heads, cfg.tie_embeddings) == (2, ref.config.tie_word_embeddings)
  tokens = np.random.default_rng(0).integers(0, TINY_LLAMA["vocab_size"], (2, 13))
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  got = forward(cfg, kio.load_weights(cfg), tokens)
  assert np.abs(want).max() > 0.5  # logits large enough for the comparison to mean something
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_hf_directory_loads_in_bfloat16_close_to_transformers(tiny_hf):
  """Weights stored and computed in bfloat16 (`model.param_dtype`, `model.dtype`)."""
  path, ref = tiny_hf
  plain = kio.model_config_from_checkpoint(str(path))
  cfg = dataclasses.replace(plain, dtype="bfloat16", param_dtype="bfloat16")
  params = kio.load_weights(cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  tokens = np.random.default_rng(3).integers(0, TINY_LLAMA["vocab_size"], (2, 13))
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  got = forward(cfg, params, tokens)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=5e-2 * np.abs(want).max())
  assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_hf_directory_loads_into_scanned_layers(tiny_hf):
  path, ref = tiny_hf
  cfg = dataclasses.replace(kio.model_config_from_checkpoint(str(path)), scan_layers=True)
  tokens = np.random.default_rng(1).integers(0, TINY_LLAMA["vocab_size"], (1, 9))
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  params = kio.load_weights(cfg)
  assert "layers" in params and "layer_0" not in params
  np.testing.assert_allclose(forward(cfg, params, tokens), want, atol=2e-5, rtol=1e-4)


def test_gated_config_loads_with_fresh_gates_and_the_rest_from_the_file(tiny_hf):
  path, ref = tiny_hf
  plain = kio.model_config_from_checkpoint(str(path))
  cfg = dataclasses.replace(plain, attention_gate=dataclasses.replace(
      plain.attention_gate, enable=True, num_heads=2, head_dim=8, threshold=1e-3))
  gated = flax.traverse_util.flatten_dict(kio.load_weights(cfg))
  loaded = flax.traverse_util.flatten_dict(kio.load_weights(plain))
  extra = set(gated) - set(loaded)
  assert extra and all(p[1:3] == ("attn", "filter") for p in extra) and set(loaded) <= set(gated)
  for p, leaf in loaded.items():
    np.testing.assert_array_equal(gated[p], leaf)
  assert all(np.abs(gated[p]).max() > 0 for p in extra)
  tokens = np.random.default_rng(2).integers(0, TINY_LLAMA["vocab_size"], (1, 11))
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  # A fresh gate's scores start ~INIT_BIAS, spread ~1: at this threshold (logit -6.9) it keeps
  # every token, so the gated model is the checkpoint's.
  got = forward(cfg, flax.traverse_util.unflatten_dict(gated), tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_gguf_logits_equal_transformers_on_the_same_file(smollm2, hf_tokenizer):
  cfg, path = smollm2
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_, cfg.vocab_size) == (
      30, 9, 3, 64, 49152)
  tokens = np.asarray(hf_tokenizer("The capital of France is Paris. The capital of Italy is")
                      ["input_ids"])[None]
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens)).logits.numpy()
  del ref
  got = forward(cfg, kio.load_weights(cfg), tokens)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
  assert hf_tokenizer.decode(got[0, -1].argmax()) == " Rome"


def test_gguf_tokenizer_equals_transformers_and_round_trips(tokenizer, hf_tokenizer):
  tok = tokenizer
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(ids, skip_special=False) == text
  assert tok.encode("<|im_end|>").tolist() == [2]  # a control token is one special id
  assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>")) == "user\nHi"


def test_chat_template_equals_transformers(tokenizer, hf_tokenizer):
  tok = tokenizer
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  for generation_prompt in (True, False):
    assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == (
        hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt))


def test_hf_directory_tokenizer_equals_transformers(hf_tokenizer, tmp_path):
  hf_tokenizer.save_pretrained(tmp_path)
  tok = tokenizer_from_hf_dir(tmp_path)
  assert (tok.eos_id, tok.vocab_size) == (hf_tokenizer.eos_token_id, len(hf_tokenizer))
  for text in TEXTS:
    assert tok.encode(text).tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text), skip_special=False) == text
  messages = [{"role": "user", "content": "Hi"}]
  assert tok.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------
# Bad files and disagreeing configs.


def test_tokenizer_larger_than_model_vocab_is_rejected(tiny_hf, hf_tokenizer, tmp_path):
  shutil.copytree(tiny_hf[0], tmp_path, dirs_exist_ok=True)
  hf_tokenizer.save_pretrained(tmp_path)
  cfg = kio.model_config_from_checkpoint(str(tmp_path))
  with pytest.raises(ConfigError, match=r"model.vocab_size=96 is smaller .* \(49152 ids\)"):
    kio.load_tokenizer(cfg)


def test_config_that_disagrees_with_checkpoint_is_rejected(tiny_hf):
  cfg = kio.model_config_from_checkpoint(str(tiny_hf[0]))
  wrong = dataclasses.replace(cfg, num_layers=3, vocab_size=128)
  with pytest.raises(ConfigError, match=r"model.vocab_size=128 but the checkpoint has 96; "
                                        r"model.num_layers=3 but the checkpoint has 2"):
    kio.load_weights(wrong)


def test_missing_checkpoint_and_empty_weights_are_rejected(tmp_path):
  cfg = dataclasses.replace(kvjax.load_config().model, weights=str(tmp_path / "nope.gguf"))
  with pytest.raises(ConfigError, match="no such file or directory.*smollm2-135m-instruct"):
    kio.load_weights(cfg)
  with pytest.raises(ConfigError, match="model.weights: is empty"):
    kio.load_weights(kvjax.load_config().model)
  with pytest.raises(ConfigError, match="no config.json"):
    kio.open_checkpoint(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture Qwen2ForCausalLM is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type='llama3' is not"),
])
def test_unsupported_hf_architectures_are_rejected(tiny_hf, tmp_path, change, message):
  shutil.copytree(tiny_hf[0], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "config.json").read_text())
  config.pop("rope_parameters", None)
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(kio.CheckpointError, match=message):
    kio.open_checkpoint(str(tmp_path))


def test_corrupt_files_are_rejected(tmp_path):
  (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
  with pytest.raises(kio.CheckpointError, match="not a GGUF file"):
    kio.open_checkpoint(str(tmp_path / "model.gguf"))
  (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
  with pytest.raises(kio.CheckpointError, match="not a readable GGUF file"):
    kio.open_checkpoint(str(tmp_path / "short.gguf"))


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray]) -> str:
  """A minimal GGUF: a 1-layer llama's metadata plus the given tensors."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_context_length(32)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(4)
  for name, array in tensors.items():
    w.add_tensor(name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gguf_with_other_architecture_or_unsupported_tensor_type_is_rejected(tmp_path):
  with pytest.raises(kio.CheckpointError, match="architecture 'gpt2' is not supported"):
    kio.open_checkpoint(write_gguf(tmp_path / "a.gguf", "gpt2", {}))
  path = write_gguf(tmp_path / "b.gguf", "llama", {"token_embd.weight": np.zeros((4, 8), np.int32)})
  cfg = kio.model_config_from_checkpoint(path)
  with pytest.raises(kio.CheckpointError, match=r"type I32, which cannot be dequantized; "
                                                r"allowed: F32, F16, .*Q4_1"):
    kio.load_weights(cfg)
  path = write_gguf(tmp_path / "c.gguf", "llama", {"blk.0.attn_q.bias": np.zeros(8, np.float32)})
  with pytest.raises(kio.CheckpointError, match="attn_q.bias' is not part of a plain Llama"):
    kio.load_weights(kio.model_config_from_checkpoint(path))
