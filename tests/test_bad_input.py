"""Bad input never ends in a traceback: property-based tests (hypothesis) over config overrides,
method combinations, MoA plan files, prompts, and truncated or garbled training checkpoints, GGUF
files and safetensors directories. Each either works or raises one `ConfigError` (CLIs print it
on one line and exit 2); a few CLI runs check that contract end to end, writing nothing."""

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import typing
import uuid
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import kvjax
from kvjax import io as kio
from kvjax.cli import UsageError, check_utf8
from kvjax.config import Config
from kvjax.decode import init_cache, prefill_cache
from kvjax.errors import ConfigError
from kvjax.moa.plan import load_plan
from kvjax.training import restore_params, train
from kvjax.training.loss import loss_fn_for
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def config_keys(cls=Config, prefix="") -> list[str]:
  """Every dotted key of the config schema, sections included."""
  keys = []
  for f in dataclasses.fields(cls):
    key = f"{prefix}{f.name}"
    keys.append(key)
    tp = typing.get_type_hints(cls)[f.name]
    inner = [t for t in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(t)]
    for sub in inner:
      keys += config_keys(sub, f"{key}.")
  return keys


KEYS = config_keys()
VALUES = st.one_of(
    st.integers(-3, 600), st.integers(-2**70, 2**70), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["llama", "block_transformer", "h2o", "byte", "gpt2", "xla", "float16"]),
    st.lists(st.integers(-2, 6), max_size=6), st.dictionaries(st.text(max_size=4), st.integers(),
                                                              max_size=2))
OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
              st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                        st.text(min_size=1, max_size=12)), VALUES),
    st.text(max_size=20)), max_size=6)


@settings(FUZZ, max_examples=400)
@given(OVERRIDES)
def test_any_overrides_load_or_fail_with_one_config_error(overrides):
  try:
    kvjax.load_config(None, overrides)
  except ConfigError as e:
    assert str(e).strip()


def trace_training_and_decoding(cfg) -> None:
  """Builds the model and traces a training gradient and a prefill (shapes only, no compile)."""
  model = kvjax.build_model(cfg.model)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  loss_fn = loss_fn_for(cfg.model.kind)
  batch = jnp.zeros((2, cfg.data.seq_len + 1), jnp.int32)
  jax.eval_shape(jax.grad(lambda p: loss_fn(model, p, batch, jax.random.key(0))[0]), params)
  cache = jax.eval_shape(lambda: init_cache(cfg.model, 2, 24))
  jax.eval_shape(lambda p, c: prefill_cache(model, p, tokens, jnp.array([16, 9]), c), params,
                 cache)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  """MoA plans for 4 layers x 4 heads, and one of the wrong shape."""
  d = tmp_path_factory.mktemp("plans")
  for name, layers in (("good", 4), ("other", 3)):
    (d / f"{name}.json").write_text(json.dumps({"alphas": [[8.0] * 4] * layers,
                                                "betas": [[0.5] * 4] * layers}))
  return d


METHODS = {
    "CLA-2": ["model.kv_sharing.factor=2"],
    "CLA pattern": ["model.kv_sharing.producer_of=[0,0,0,3]"],
    "scanned layers": ["model.scan_layers=true"], "remat": ["model.remat=true"],
    "attention gate": ["model.attention_gate.enable=true"],
    "gated decoding": ["model.attention_gate.enable=true", "model.attention_gate.gate_decode=true"],
    "H2O eviction": ["model.eviction.policy=h2o"], "MoA": ["model.moa.plan={plans}/good.json"],
    "MoA plan of another shape": ["model.moa.plan={plans}/other.json"],
    "Block Transformer": ["model.kind=block_transformer"], "untied": ["model.tie_embeddings=false"],
}


@settings(FUZZ, max_examples=30)
@given(st.sets(st.sampled_from(sorted(METHODS)), max_size=3))
@example({"MoA", "attention gate"})  # was accepted, then failed in the attention layer
def test_method_combinations_are_rejected_at_load_or_trace_training_and_decoding(plans, methods):
  overrides = [*TINY, "model.num_layers=4", "model.moa.block_size=8", "model.moa.sink_tokens=4",
               *(o.format(plans=plans) for m in sorted(methods) for o in METHODS[m])]
  try:
    cfg = kvjax.load_config(None, overrides)
  except ConfigError as e:
    assert str(e).strip()
    return
  trace_training_and_decoding(cfg)


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                    st.sampled_from([-1e9, -64.0, 0.0, 0.5, 1.0, 1.5]))
TABLES = st.one_of(
    st.lists(st.lists(NUMBERS, min_size=4, max_size=4), min_size=2, max_size=2),  # right shape
    st.lists(st.lists(NUMBERS, max_size=5), max_size=3),
    st.lists(st.one_of(NUMBERS, st.text(max_size=3), st.none()), max_size=3), NUMBERS)
PLAN_FILES = st.one_of(
    st.fixed_dictionaries({"alphas": TABLES, "betas": TABLES}).map(
        lambda d: json.dumps(d).encode()),
    st.dictionaries(st.sampled_from(["alphas", "betas", "gammas"]), TABLES).map(
        lambda d: json.dumps(d).encode()),
    st.binary(max_size=40), st.just(b'{"alphas": [[NaN]], "betas": [[0.5]]}'))


@settings(FUZZ)
@given(PLAN_FILES)
def test_any_plan_file_loads_or_fails_with_one_config_error(tmp_path_factory, content):
  path = tmp_path_factory.getbasetemp() / f"plan-{uuid.uuid4().hex}.json"
  path.write_bytes(content)
  try:
    cfg = kvjax.load_config(None, [*TINY, "model.moa.block_size=8", "model.moa.sink_tokens=4",
                                   f"model.moa.plan={path}"])
  except ConfigError as e:
    assert str(e).strip()
    return
  for n in (1, 16, 64):  # an accepted plan gives every head whole blocks, two at least
    sizes = load_plan(cfg.model.moa.plan).cache_sizes(n, 8)
    assert (sizes % 8 == 0).all() and (sizes >= 16).all()


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=12))
def test_a_prompt_from_argv_is_rejected_iff_its_bytes_are_not_utf8(raw):
  text = os.fsdecode(raw)  # what Python makes of the bytes of an argument
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    with pytest.raises(UsageError, match=f"byte {raw[e.start]:#04x} at position "):
      check_utf8("--prompt", text)
  else:
    check_utf8("--prompt", text)


# ---- Truncated and garbled files.

MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("replace"), st.binary(max_size=64)))


def mutate(data: bytes, mutation) -> bytes:
  kind, arg = mutation
  if kind == "truncate":
    return data[:int(len(data) * arg)]
  if kind == "replace":
    return arg
  out = bytearray(data)
  for where, value in arg:
    if out:
      out[min(int(len(out) * where), len(out) - 1)] = value
  return bytes(out)


@pytest.fixture(scope="module")
def workdir(text_dir, tmp_path_factory):
  """A training run of two steps with a checkpoint at each."""
  cfg = kvjax.load_config(None, [*TINY, f"data.source={text_dir}", "train.batch_size=2",
                                 "train.steps=2", "train.checkpoint_every=1", "train.eval_every=2",
                                 "train.eval_batches=1", "train.sample_tokens=0"])
  path = tmp_path_factory.mktemp("trained")
  train(cfg, path)
  return cfg, path, jax.tree.map(np.shape, restore_params(path, cfg))


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_garbled_training_checkpoint_restores_or_fails_with_one_checkpoint_error(
    workdir, tmp_path_factory, data):
  cfg, path, shapes = workdir
  files = sorted(str(f.relative_to(path)) for f in (path / "checkpoints" / "2").rglob("*")
                 if f.is_file())
  name = data.draw(st.sampled_from(files))
  copy = shutil.copytree(path, tmp_path_factory.getbasetemp() / f"run-{uuid.uuid4().hex}")
  (copy / name).write_bytes(mutate((copy / name).read_bytes(), data.draw(MUTATIONS)))
  try:
    params = restore_params(copy, cfg)
  except kio.CheckpointError as e:
    assert "checkpoint step 2 in " in str(e)
    return
  assert jax.tree.map(np.shape, params) == shapes


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_restore_leaves_no_traceback_behind(workdir, tmp_path, capfd):
  """orbax's other reads of a step that failed end after its event loop has closed; Python
  printed each as a traceback ("Event loop is closed") after the one-line error."""
  cfg, path, _ = workdir
  copy = shutil.copytree(path, tmp_path / "run")
  metadata = copy / "checkpoints" / "2" / "params" / "array_metadatas" / "process_0"
  metadata.write_bytes(metadata.read_bytes()[:20])
  for _ in range(10):
    with pytest.raises(kio.CheckpointError, match="checkpoint step 2 in .* cannot be read"):
      restore_params(copy, cfg)
  time.sleep(0.5)
  gc.collect()
  assert "Traceback" not in capfd.readouterr().err


VOCAB = ["a", "b", "c", "ab", "<s>", "</s>", "d", "e"]
TINY_ARCH = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, intermediate_size=16, max_position_embeddings=32,
                 rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=True)


def tiny_tensors() -> dict[str, np.ndarray]:
  """A 1-layer Llama in HF names and layout."""
  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (8, 8), "model.norm.weight": (8,)}
  layer = {"input_layernorm": (8,), "post_attention_layernorm": (8,),
           "self_attn.q_proj": (8, 8), "self_attn.k_proj": (8, 8), "self_attn.v_proj": (8, 8),
           "self_attn.o_proj": (8, 8), "mlp.gate_proj": (16, 8), "mlp.up_proj": (16, 8),
           "mlp.down_proj": (8, 16)}
  shapes |= {f"model.layers.0.{k}.weight": s for k, s in layer.items()}
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "input_layernorm": "attn_norm", "post_attention_layernorm":
              "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """The Q/K row order llama.cpp's converter writes (its `permute`)."""
  return w_OxI.reshape(n_heads, 2, w_OxI.shape[0] // n_heads // 2, *w_OxI.shape[1:]).swapaxes(
      1, 2).reshape(w_OxI.shape)


def gguf_name(hf: str) -> str:
  if hf in GGUF_NAMES:
    return GGUF_NAMES[hf]
  part = hf.removeprefix("model.layers.0.").removesuffix(".weight")
  return f"blk.0.{GGUF_NAMES[part]}.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The same tiny Llama as a GGUF file (with a tokenizer) and as an HF safetensors directory."""
  d = tmp_path_factory.mktemp("pretrained")
  tensors = tiny_tensors()
  w = gguf.GGUFWriter(str(d / "tiny.gguf"), "llama")
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_head_count_kv(2)
  w.add_context_length(32)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(8)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(VOCAB)
  w.add_token_types([1, 1, 1, 1, 3, 3, 1, 1])
  w.add_token_merges(["a b"])
  w.add_bos_token_id(4)
  w.add_eos_token_id(5)
  for name, array in tensors.items():
    permuted = "q_proj" in name or "k_proj" in name
    w.add_tensor(gguf_name(name), llama_cpp_permute(array, 2) if permuted else array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  (d / "hf").mkdir()
  (d / "hf" / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY_ARCH}))
  save_file(tensors, str(d / "hf" / "model.safetensors"))
  return d


def load_everything(weights: str):
  cfg = kio.model_config_from_checkpoint(weights)
  params = kio.load_weights(cfg)
  if weights.endswith(".gguf"):
    kio.load_tokenizer(cfg).encode("abc")
  return params


def test_pristine_gguf_and_safetensors_load_the_same_weights(checkpoints):
  from_gguf = load_everything(str(checkpoints / "tiny.gguf"))
  from_hf = load_everything(str(checkpoints / "hf"))
  jax.tree.map(np.testing.assert_array_equal, from_gguf, from_hf)


@settings(FUZZ, max_examples=80)
@given(name=st.sampled_from(["tiny.gguf", "hf/config.json", "hf/model.safetensors"]),
       mutation=MUTATIONS)
def test_garbled_gguf_and_safetensors_load_or_fail_with_one_config_error(
    checkpoints, tmp_path_factory, name, mutation):
  copy = tmp_path_factory.getbasetemp() / f"weights-{uuid.uuid4().hex}"
  shutil.copytree(checkpoints, copy)
  (copy / name).write_bytes(mutate((copy / name).read_bytes(), mutation))
  try:
    load_everything(str(copy / name.split("/")[0]))
  except ConfigError as e:
    assert str(e).strip()


@settings(FUZZ, max_examples=80)
@given(st.dictionaries(st.sampled_from([*TINY_ARCH, "head_dim", "architectures", "hidden_act",
                                        "rope_scaling", "rope_parameters"]), VALUES, min_size=1,
                       max_size=3))
def test_hf_config_with_any_values_loads_or_fails_with_one_config_error(
    checkpoints, tmp_path_factory, changes):
  copy = shutil.copytree(checkpoints / "hf", tmp_path_factory.getbasetemp() /
                         f"hf-{uuid.uuid4().hex}")
  config = json.loads((copy / "config.json").read_text())
  (copy / "config.json").write_text(json.dumps({**config, **changes}))
  try:
    load_everything(str(copy))
  except ConfigError as e:
    assert str(e).strip()


# ---- The command-line tools, end to end: one line on stderr, exit code 2, nothing written.

SMALL = [*TINY, "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def cli_runs(workdir, cli_env, tmp_path_factory):
  """Every case below, run at once as subprocesses: {case: (returncode, stdout, stderr, out)}."""
  cfg, trained, _ = workdir
  d = tmp_path_factory.mktemp("cli")
  garbled = shutil.copytree(trained, d / "garbled")
  for f in (garbled / "checkpoints" / "2" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:20])
  (d / "latin1.txt").write_bytes("naïve café".encode("latin-1"))
  (d / "plan.json").write_text('{"alphas": [[0, 0, 0, 0]], "betas": [[-0.5, 0, 0, 0]]}')
  source = f"data.source={cfg.data.source}"
  decode = [sys.executable, str(ROOT / "decode.py"), "--checkpoint", str(trained), *SMALL, source]
  cases = {
      "empty prompt": ([*decode, "--prompt", "", "--gen-len", "5", "--batch", "2"], None),
      "prompt of non-UTF-8 bytes": ([*decode, "--prompt", b"caf\xe9", "--json", d / "a.json"],
                                    d / "a.json"),
      "prompt longer than the cache": ([*decode, "--prompt", "x" * 70, "--json", d / "b.json"],
                                       d / "b.json"),
      "garbled checkpoint": ([*decode[:2], "--checkpoint", str(garbled), *decode[4:], "--prompt",
                              "a", "--json", d / "c.json"], d / "c.json"),
      "train.py, a negative learning rate": ([sys.executable, str(ROOT / "train.py"),
                                              "--workdir", d / "run", *SMALL, source,
                                              "train.lr=-1"], d / "run"),
      "eval, a text that is not UTF-8": ([sys.executable, "-m", "kvjax.eval", "--config",
                                          str(ROOT / "configs" / "tiny.yaml"), "--checkpoint",
                                          str(trained), "--task", "perplexity", *SMALL, source,
                                          "--text", d / "latin1.txt", "--json", d / "e.json"],
                                         d / "e.json"),
      "moa, a plan with a negative beta": ([sys.executable, "-m", "kvjax.moa", "uniform",
                                            "--config", str(ROOT / "configs" / "tiny.yaml"),
                                            "--out", d / "u.json", *SMALL,
                                            f"model.moa.plan={d / 'plan.json'}"], d / "u.json"),
  }
  procs = {case: subprocess.Popen([os.fsencode(a) if isinstance(a, Path) else a for a in argv],
                                  cwd=ROOT, env=cli_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
           for case, (argv, _) in cases.items()}
  return {case: (p.wait(timeout=600), p.stdout.read().decode(), p.stderr.read().decode(),
                 cases[case][1]) for case, p in procs.items()}


@pytest.mark.parametrize("case, message", [
    ("prompt of non-UTF-8 bytes", "error: --prompt: not valid UTF-8 (byte 0xe9 at position 3); "
                                  "allowed: UTF-8 text"),
    ("prompt longer than the cache", "error: prompt (70 tokens) + --gen-len 128 exceeds "
                                     "model.max_seq_len=64"),
    ("garbled checkpoint", "error: checkpoint step 2 in "),
    ("train.py, a negative learning rate", "error: train.lr: must be > 0"),
    ("eval, a text that is not UTF-8", "latin1.txt: not UTF-8 text (byte 0xef at offset 2)"),
    ("moa, a plan with a negative beta", "betas[0][0] must be in [0, 1], got -0.5"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(cli_runs, case, message):
  code, _, err, output = cli_runs[case]
  assert code == 2, err[-3000:]
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err[-3000:]
  assert not output.exists()


def test_cli_empty_prompt_generates_from_the_start_of_a_document(cli_runs):
  code, out, err, _ = cli_runs["empty prompt"]
  assert code == 0, err[-3000:]
  assert out.count("--- ") == 2
