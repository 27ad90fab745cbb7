"""Quantized cache entries (`model.kv_quant`): the codecs against a NumPy oracle, and every layout
storing codes and scales as it would store the oracle's round trip of its values.

The layout test runs each layout twice on the same tokens: once with the quantized cache, once
with a float32 cache into which every entry goes as the oracle's quantize-dequantize round trip
(a `Storage` defined here, given to `init_cache` in place of the registry's choice). Equal logits
(to float32 rounding: XLA may fuse the dequantizing multiply into attention's reduction and so
reorder its arithmetic; a code or scale out of place would move them by a quantization step) mean
that prefill, decode, compaction, ring buffers and stacked buffers move codes and scales
together and read them back as the oracle says; `tests/test_matrix.py` shows that the float32
cache computes the method's masked full forward.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import decode
import kvjax
from kvjax import registry
from kvjax.cache.compact import compact_layout
from kvjax.cache.storage import PlainStorage
from kvjax.decode import SamplingConfig, decode_step, generate, init_cache, prefill_cache
from kvjax.errors import ConfigError
from kvjax.layers.cache import Chunk
from kvjax.moa.plan import Plan
from kvjax.quant import dequantize, quantize
from kvjax.quant import method as quant_method
from kvjax.quant.storage import QuantStorage

B, P, G = 2, 24, 4  # batch, padded prompt width, new tokens
N = P + G
LENGTHS = np.array([24, 17])
CHUNK = 8  # prefill in chunks where the cache allows: later chunks read earlier codes
BASE = ("model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=64", "model.init_std=0.2", "data.seq_len=32")
SELECTIONS = {
    "dense": (),
    "moa": ("model.moa.block_size=8", "model.moa.sink_tokens=4"),
    "gate": ("model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
             "model.attention_gate.head_dim=8", "model.attention_gate.num_sinks=2",
             "model.attention_gate.gate_decode=true"),
    "h2o": ("model.eviction.policy=h2o", "model.eviction.keep_ratio=0.5"),
}
MODELS = {"llama": (), "scanned": ("model.scan_layers=true",),
          "block": ("model.kind=block_transformer", "model.block.block_len=4",
                    "model.block.num_prefix=2")}
SHARING = {"none": (), "cla2": ("model.kv_sharing.factor=2",)}
# Every layout once, each mode on several of them (head_dim 8; groups of 4 values: two scales),
# rotated codes on some.
CELLS = [("llama", "none", "dense", "int8", 0, False), ("llama", "cla2", "dense", "int4", 0, True),
         ("scanned", "cla2", "dense", "fp8", 0, True),
         ("llama", "cla2", "moa", "int4", 4, False), ("llama", "none", "gate", "int8", 0, False),
         ("llama", "none", "h2o", "int4", 4, True), ("block", "none", "dense", "fp8", 4, False),
         ("block", "cla2", "h2o", "int8", 0, True)]
PLAN = Plan(alphas=((16.0, 0.0, 24.0, 8.0),) * 2, betas=((0.0, 0.3, 0.0, 0.5),) * 2)
PROMPTS = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 0, 256, jnp.int32))

# ---------------------------------------------------------------------------------------------
# The oracle.

QMAX = {"int8": 127, "fp8": 448, "int4": 7}


def oracle(x, mode: str, group: int) -> tuple[np.ndarray, np.ndarray]:
  """Codes `[..., D]` (as float32 values) and float32 scales `[..., D / g]`: a scale is the
  group's max |x| over the largest code, rounded to bfloat16; codes are x over that scale,
  clipped and rounded to the code type (half to even)."""
  x = np.asarray(x, np.float32)
  d = x.shape[-1]
  x_g = x.reshape(*x.shape[:-1], d // (group or d), group or d)
  s = (np.abs(x_g).max(-1) / np.float32(QMAX[mode])).astype(ml_dtypes.bfloat16).astype(np.float32)
  y = np.clip(x_g / np.where(s > 0, s, np.float32(1))[..., None], -QMAX[mode], QMAX[mode])
  codes = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) if mode == "fp8" else np.rint(y)
  return codes.reshape(x.shape), s


def walsh_hadamard(d: int) -> np.ndarray:
  """Orthonormal: entry (i, j) is (-1)^popcount(i & j) / sqrt(d)."""
  i = np.arange(d)
  parity = np.vectorize(lambda n: bin(n).count("1") % 2)(i[:, None] & i[None, :])
  return (1 - 2 * parity).astype(np.float64) / np.sqrt(d)


def round_trip(x, mode: str, group: int, rotate: bool = False) -> np.ndarray:
  """Codes times scales; with `rotate`, of the values' rotation, rotated back."""
  if rotate:
    h = walsh_hadamard(x.shape[-1])
    y = (np.asarray(x, np.float64) @ h).astype(np.float32)
    return (round_trip(y, mode, group).astype(np.float64) @ h).astype(np.float32)
  codes, s = oracle(x, mode, group)
  d = codes.shape[-1]
  return (codes.reshape(*s.shape, d // s.shape[-1]) * s[..., None]).reshape(codes.shape)


@dataclasses.dataclass(frozen=True)
class RoundTripStorage(PlainStorage):
  """float32 entries, each stored as the oracle's round trip of its values."""

  mode: str = "int8"
  group: int = 0
  rotate: bool = False

  def put(self, buf, index, values):
    stored = jax.pure_callback(
        lambda x: round_trip(x, self.mode, self.group, self.rotate).astype(np.float32),
        jax.ShapeDtypeStruct(values.shape, jnp.float32), values)
    return super().put(buf, index, stored)


# ---------------------------------------------------------------------------------------------
# The codecs.


def sample_values():
  """Rows of 16: normal values, one outlier, all zeros, tiny and huge magnitudes, ties."""
  x = np.random.default_rng(0).standard_normal((6, 3, 16), np.float32)
  x[1, :, 5] = 40.0
  x[2, 0] = 0.0
  x[3] *= 1e-30
  x[4] *= 1e30
  halves = np.arange(16, dtype=np.float32) % 7 - 2.5  # halfway between codes at scale 1 ...
  x[5, 0], x[5, 1] = np.r_[7, halves[1:]], np.r_[127, halves[1:]]  # ... for int4, int8
  return x


@pytest.mark.parametrize("mode, group", [(m, g) for m in QMAX for g in (0, 4)])
def test_round_trip_is_the_oracle_and_within_half_a_step(mode, group):
  x = sample_values()
  got = np.asarray(dequantize(quantize(jnp.asarray(x), mode, group), mode))
  np.testing.assert_array_equal(got, round_trip(x, mode, group))
  amax = np.abs(x.reshape(*x.shape[:-1], -1, group or 16)).max(-1)
  amax_x = np.repeat(amax, x.shape[-1] // amax.shape[-1], axis=-1)
  err = np.abs(got - x)
  if mode == "fp8":  # 3 mantissa bits: half an ulp is 1/16 of the value; + scale rounding
    assert np.all(err <= x.dtype.type(2**-4) * np.abs(x) + amax_x * 2**-9)
  else:  # half a code step, the step grown by at most the scale's bfloat16 rounding
    assert np.all(err <= amax_x / (2 * QMAX[mode]) * (1 + 2**-8))
  assert np.all(got[2, 0] == 0)


@pytest.mark.parametrize("mode, group", [(m, g) for m in QMAX for g in (0, 4)])
def test_rotated_round_trip_is_the_oracle_of_the_rotated_values(mode, group):
  """Quantized in the Walsh-Hadamard basis: the oracle's round trip of x H, times H (to float32
  rounding of the rotations); the error's norm per head is the rotated round trip's, within
  half a code step (fp8: half an ulp) per rotated value."""
  x = sample_values()
  got = np.asarray(dequantize(quantize(jnp.asarray(x), mode, group, True), mode,
                              rotated=True))
  scale = np.abs(x).max(-1, keepdims=True)
  assert np.all(np.abs(got - round_trip(x, mode, group, rotate=True)) <= 1e-6 * scale)
  y = x.astype(np.float64) @ walsh_hadamard(16)
  amax = np.abs(y.reshape(*y.shape[:-1], -1, group or 16)).max(-1)
  step = np.repeat(amax, y.shape[-1] // amax.shape[-1], axis=-1) / QMAX[mode]
  bound = 2.0**-4 * np.abs(y) + step * 2**-9 if mode == "fp8" else step / 2 * (1 + 2**-8)
  assert np.all(((got.astype(np.float64) - x) ** 2).sum(-1) <= (bound**2).sum(-1) * (1 + 1e-5))


def test_rotation_spreads_an_outlier_channel():
  """One channel 40x the others: unrotated, it sets its head's int4 scale and the other values
  round to zero; rotated (16 values share the outlier), the head's error is under half of that."""
  x = sample_values()[1:2]
  err = lambda rotated: np.linalg.norm(np.asarray(dequantize(
      quantize(jnp.asarray(x), "int4", 0, rotated), "int4", rotated=rotated)) - x)
  assert err(True) * 2 < err(False)


def test_bfloat16_values_quantize_as_their_float32_values():
  x = sample_values()[:3].astype(ml_dtypes.bfloat16)
  got = np.asarray(dequantize(quantize(jnp.asarray(x), "int8"), "int8"))
  np.testing.assert_array_equal(got, round_trip(x.astype(np.float32), "int8", 0))


def test_int4_bytes_hold_value_j_low_and_value_j_plus_half_high():
  """The layout a kernel reads: byte j of a head's D/2 bytes, low nibble value j, high nibble
  value j + D/2, each a two's-complement code in [-7, 7]."""
  x = sample_values()
  q = quantize(jnp.asarray(x), "int4", 4)
  packed = np.asarray(q.codes).view(np.uint8).astype(np.int16)
  signed = lambda n: np.where(n >= 8, n - 16, n)
  codes, scales = oracle(x, "int4", 4)
  np.testing.assert_array_equal(signed(packed & 0xF), codes[..., :8])
  np.testing.assert_array_equal(signed(packed >> 4), codes[..., 8:])
  np.testing.assert_array_equal(np.asarray(q.scales, np.float32), scales)


# ---------------------------------------------------------------------------------------------
# Every layout.


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("plan") / "plan.json"
  PLAN.save(path)
  return path


def cell_config(model_kind, sharing, selection, mode, group, rotate, plan_path):
  extra = (f"model.moa.plan={plan_path}",) if selection == "moa" else ()
  return kvjax.load_config(None, [*BASE, *MODELS[model_kind], *SHARING[sharing],
                                  *SELECTIONS[selection], *extra, f"model.kv_quant.mode={mode}",
                                  f"model.kv_quant.group_size={group}",
                                  f"model.kv_quant.rotate={str(rotate).lower()}"]).model


@functools.cache
def step_fn(model):
  return jax.jit(lambda p, tok, pos, cache: decode_step(model, p, tok, pos, cache))


def decode_steps(model, params, cache, fed=None):
  """Chunked prefill and G - 1 decode steps, feeding the argmax (or `fed` tokens): prompt
  logits, step logits, the tokens fed, the cache decode starts from."""
  cache, last_BxV, prompt_logits = prefill_cache(model, params, PROMPTS, LENGTHS, cache,
                                                 chunk=CHUNK, keep_logits=True)
  cache = cache.finish_prefill(G - 1, jax.random.key(2))
  start = cache
  tokens = np.asarray(jnp.argmax(last_BxV, -1))[:, None] if fed is None else fed
  logits = [last_BxV]
  for i in range(G - 1):
    step_logits, cache = step_fn(model)(params, tokens[:, i], jnp.asarray(LENGTHS) + i, cache)
    logits.append(step_logits)
    if fed is None:
      tokens = np.concatenate([tokens, np.asarray(jnp.argmax(step_logits, -1))[:, None]], 1)
  return np.asarray(prompt_logits), np.stack(logits, 1), tokens, start


def expected_nbytes(reference, cfg) -> int:
  """The float32 cache's bytes with every K/V entry (a `k` / `v` leaf's last axis: D values)
  replaced by its codes and scales."""
  q = cfg.kv_quant
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(reference):
    if getattr(path[-1], "name", None) in ("k", "v"):
      d = x.shape[-1]
      codes = {"int8": d, "fp8": d, "int4": d // 2}[q.mode]
      total += x.size // d * (codes + 2 * (d // (q.group_size or d)))
    else:
      total += x.nbytes
  return total


@pytest.mark.parametrize("model_kind, sharing, selection, mode, group, rotate", CELLS,
                         ids=["-".join(map(str, c[:5])) + "-rotated" * c[5] for c in CELLS])
def test_quantized_cache_decodes_as_its_round_trip(model_kind, sharing, selection, mode, group,
                                                   rotate, plan_path, monkeypatch):
  cfg = cell_config(model_kind, sharing, selection, mode, group, rotate, plan_path)
  model = kvjax.build_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  prompt_q, steps_q, tokens, start_q = decode_steps(model, params, init_cache(cfg, B, N))

  monkeypatch.setattr(registry, "storage", lambda c: RoundTripStorage(
      c.dtype, c.kv_quant.mode, c.kv_quant.group_size, c.kv_quant.rotate))
  prompt_r, steps_r, _, start_r = decode_steps(model, params, init_cache(cfg, B, N), tokens)

  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(prompt_q[b, :n], prompt_r[b, :n], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(steps_q, steps_r, rtol=1e-5, atol=1e-5)
  assert start_q.nbytes == expected_nbytes(start_r, cfg)
  if model_kind != "block" and selection == "dense":
    assert start_q.nbytes == cfg.kv_bytes_per_token() * B * N
  if (model_kind, sharing, selection) == ("llama", "cla2", "dense"):  # once: the decode loop
    monkeypatch.undo()
    out = generate(model, params, PROMPTS, LENGTHS, max_new_tokens=G, rng=jax.random.key(0),
                   cache=init_cache(cfg, B, N), sampling=SamplingConfig(), chunk=CHUNK)
    np.testing.assert_array_equal(out.tokens, tokens)


@pytest.mark.parametrize("rotate", [False, True], ids=["codes", "rotated_codes"])
def test_the_kernel_reads_the_codes_a_compacted_cache_dequantizes(rotate):
  """Under `attention_impl=pallas` a flat (compacted) layout hands the block-sparse kernel its
  codes and scales (`Storage.kernel_operand`): the same attention as the jnp path over the
  values `read` dequantizes; rotated codes are read by a rotated query. (Dense layouts:
  tests/test_kernels.py's greedy decode.)"""
  b, s, kh, h, d = 2, 40, 2, 4, 16
  keys = jax.random.split(jax.random.key(5), 4)
  k, v = (jax.random.normal(key, (b, s, kh, d)) for key in keys[:2])
  keep = jax.random.uniform(keys[2], (b, s, kh)) < 0.6
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  write = jax.jit(lambda chunk: compact_layout(b, s, kh, d, QuantStorage("int4", 8, rotate=rotate),
                                               impl="pallas").write(chunk))
  layer = write(Chunk(k, v, positions, keep)).finish_prefill(4, jax.random.key(0))
  q = jax.random.normal(keys[3], (b, 1, h, d))
  last = Chunk(k=None, v=None, positions=jnp.full((b, 1), s - 1, jnp.int32))
  attend = jax.jit(lambda layer: layer.attend(q, last)[0])
  np.testing.assert_allclose(attend(layer), attend(layer.replace(impl="xla")), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config and the CLI.


@pytest.mark.parametrize("override, message", [
    ("model.kv_quant.mode=int2", "model.kv_quant.mode: got 'int2', allowed: none, int8, fp8, int4"),
    ("model.kv_quant.group_size=-1", "model.kv_quant.group_size: must be >= 0"),
    ("model.kv_quant.group_size=3", "model.kv_quant.group_size: must divide model.head_dim=8, "
                                    "got 3"),
    ("model.head_dim=7", "model.head_dim: must be even for RoPE, got 7"),  # so int4 fills bytes
    ("model.kv_quant.rotate=true model.head_dim=6", "model.kv_quant.rotate: the Walsh-Hadamard "
                                                    "rotation needs a power-of-two model.head_dim, "
                                                    "got 6"),
    ("model.kv_quant.rotate=true model.kv_quant.mode=none", "model.kv_quant.rotate: rotates "
                                                           "quantized entries: set model.kv_quant"
                                                           ".mode to int8, fp8 or int4"),
])
def test_bad_settings_are_one_line_at_load(override, message):
  with pytest.raises(ConfigError) as e:
    kvjax.load_config(None, [*BASE, "model.kv_quant.mode=int4", *override.split()])
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_group_must_divide_every_stored_head():
  with pytest.raises(ConfigError, match=r"must divide model.block.token_decoder.head_dim=4"):
    kvjax.load_config(None, [*BASE, *MODELS["block"], "model.block.token_decoder.head_dim=4",
                             "model.kv_quant.mode=int8", "model.kv_quant.group_size=8"])
  with pytest.raises(ConfigError, match=r"must divide model.attention_gate.head_dim=6"):
    kvjax.load_config(None, [*BASE, *SELECTIONS["gate"], "model.attention_gate.head_dim=6",
                             "model.kv_quant.mode=int8", "model.kv_quant.group_size=4"])


def test_a_code_type_the_backend_cannot_convert_is_rejected_at_load(monkeypatch, capsys, tmp_path):
  assert quant_method.conversion_error("float8_e4m3fn", "cpu") is None
  monkeypatch.setitem(quant_method.CODE_DTYPES, "fp8", "float8_nonexistent")
  with pytest.raises(ConfigError) as e:
    kvjax.load_config(None, [*BASE, "model.kv_quant.mode=fp8"])
  assert str(e.value).startswith("model.kv_quant.mode: fp8 (float8_nonexistent) is not supported "
                                 "on the cpu backend (")
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit) as e:
    decode.main([*BASE, "model.kv_quant.mode=fp8", "--json", str(tmp_path / "x.json")])
  assert e.value.code == 2 and not (tmp_path / "x.json").exists()
  assert capsys.readouterr().err.count("\n") == 1


def test_decode_reports_the_quantized_cache(tmp_path):
  out = tmp_path / "r.json"
  decode.main(["--batch", "1", "--prompt-len", "4", "--gen-len", "2", "--json", str(out), *BASE,
               "model.kv_quant.mode=int4", "model.kv_quant.group_size=4",
               "model.kv_quant.rotate=true"])
  r = json.loads(out.read_text())
  assert r["method"] == "llama/gqa2/int4@g4+rot"
  assert r["methods"] == {"kv_quant": {"mode": "int4", "group_size": 4, "rotate": True}}
  # K and V, 2 KV heads, 2 layers: 4 bytes of codes and 2 bfloat16 scales per entry (a rotation
  # stores nothing).
  assert r["kv_bytes_per_token"] == 2 * 2 * 2 * (4 + 2 * 2)
