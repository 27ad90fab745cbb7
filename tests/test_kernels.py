"""Pallas decode kernels: interpret mode == a float64 NumPy oracle, for float and quantized
caches, cross-lowering for every shipped config, the eligibility rules, the decode loop."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kvjax
from kvjax import registry
from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.pallas_kernels import (block_sparse_decode, eligibility, range_tables,
                                  shared_kv_decode)
from kvjax.pallas_kernels.block_sparse_decode_ref import block_sparse_decode_ref
from kvjax.pallas_kernels.blocked_decode import blocked_decode
from kvjax.pallas_kernels.coverage import abstract_call, config_cases
from kvjax.pallas_kernels.quantized import QuantizedKV
from kvjax.pallas_kernels.shared_kv_decode_ref import shared_kv_decode_ref
from tests.helpers import random_tokens, tiny_model

BS = 16  # block size in interpret-mode tests
BACKENDS = ("triton", "mosaic_tpu")
# The oracle is float64 NumPy, so float32 tolerances hold on GPUs whose XLA dots default to
# TF32 (Hopper); bf16 tolerances cover the kernels' bf16 probabilities in the P @ V product.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


def normal(seed, shape, dtype):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def attention_oracle(q_GxD, k_TxD, v_TxD):
  """Softmax attention in float64 NumPy: shares no code with kvjax; no keys gives zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_GxD, k_TxD, v_TxD))
  if not len(k):
    return np.zeros_like(q)
  logits = q @ k.T / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (p / p.sum(axis=-1, keepdims=True)) @ v


def dense_oracle(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths):
  b, h, _ = q_BxHxD.shape
  g = h // k_BxSxKxD.shape[2]
  return np.stack([np.stack([attention_oracle(q_BxHxD[i, j:j + 1], k_BxSxKxD[i, :n, j // g],
                                              v_BxSxKxD[i, :n, j // g])[0]
                             for j in range(h)]) for i, n in enumerate(lengths)])


def assert_close(out, want, dtype):
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=TOL[dtype], rtol=TOL[dtype])


# -------------------------------------------------------------------------------------------
# Interpret mode == the oracle. Lengths at block boundaries, empty and full heads; head dims
# that are not powers of two or lane multiples; GQA, MQA, MHA; float32 groups on both Triton
# paths (FMA below 16 rows, dot at 16).

# (KV heads, query heads per KV head, head dim, dtype)
HEADS = {"gqa-d24-f32": (2, 4, 24, jnp.float32), "mqa-d80-bf16": (1, 8, 80, jnp.bfloat16),
         "mha-d64-bf16": (3, 1, 64, jnp.bfloat16), "gqa16-d128-f32": (2, 16, 128, jnp.float32)}


def dense_inputs(heads, s, lengths, lead=()):
  k, g, d, dtype = HEADS[heads]
  b = len(lengths)
  return (normal(0, (b, k * g, d), dtype), normal(1, (*lead, b, s, k, d), dtype),
          normal(2, (*lead, b, s, k, d), dtype), jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_kv_decode_matches_oracle(backend, heads):
  """A capacity that is not a block multiple, so the last block is partial (a rounded-up DMA
  on TPU, masked loads on GPU); splits from the default to more than a head has blocks."""
  s = 3 * BS - 5
  lengths = [0, 1, BS - 1, BS, BS + 1, s]
  q, k, v, lens = dense_inputs(heads, s, lengths)
  dtype = HEADS[heads][3]
  want = dense_oracle(q, k, v, lengths)
  for splits in (None, 4):
    out = shared_kv_decode(q, k, v, lens, block_size=BS, num_splits=splits, backend=backend)
    assert_close(out, want, dtype)
  np.testing.assert_array_equal(out[0], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stack_is_read_at_its_index(backend):
  """A `[G, B, S, K, D]` stack read at a traced index == that layer's oracle."""
  lengths = [5, 2 * BS]
  q, k, v, lens = dense_inputs("gqa-d24-f32", 2 * BS, lengths, lead=(3,))
  read = jax.jit(functools.partial(shared_kv_decode, block_size=BS, backend=backend))
  for layer in (0, 2):
    out = read(q, k, v, lens, stack_index=jnp.int32(layer))
    assert_close(out, dense_oracle(q, k[layer], v[layer], lengths), jnp.float32)


@pytest.mark.parametrize("dma_mode", ["eager", "on_wait"])
def test_tpu_chunks_double_buffer(dma_mode):
  """Several chunks per head and a split: eager DMAs would overwrite a buffer still being read,
  on-wait DMAs would leave one unread, if the prefetch and the waits were out of step."""
  k, g, d, dtype = 3, 3, 64, jnp.bfloat16
  s, lengths = 7 * BS + 3, [0, 2 * BS, 5 * BS + 1, 7 * BS + 3]
  b = len(lengths)
  q, kc, vc = normal(0, (b, k * g, d), dtype), normal(1, (b, s, k, d), dtype), normal(
      2, (b, s, k, d), dtype)
  counts = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32)[:, None], (b, k))
  params = pltpu.InterpretParams(dma_execution_mode=dma_mode, out_of_bounds_reads="uninitialized")
  for splits in (1, 2):
    out = blocked_decode(q, kc.reshape(1, b, s, k * d), vc.reshape(1, b, s, k * d), 0, counts,
                         None, layout="dense", block_size=BS, num_splits=splits,
                         backend="mosaic_tpu", interpret=params, blocks_per_chunk=2)
    assert_close(out, dense_oracle(q, kc, vc, lengths), dtype)


def moa_like_layout(b, k, d, dtype, sizes_blocks):
  """A flat `[B, N, D]` buffer where head h owns a contiguous run of `sizes_blocks[h]` blocks."""
  starts = np.concatenate([[0], np.cumsum(sizes_blocks)[:-1]])
  n = int(np.sum(sizes_blocks)) * BS
  kf, vf = normal(10, (b, n, d), dtype), normal(11, (b, n, d), dtype)
  tables = range_tables(jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (b, k)),
                        int(max(sizes_blocks)))
  return kf, vf, tables, starts


def flat_oracle(q_BxHxD, k_BxNxD, v_BxNxD, starts, num_tokens, block=BS):
  b, h, _ = q_BxHxD.shape
  k = num_tokens.shape[1]
  g = h // k
  out = np.zeros(q_BxHxD.shape)
  for i in range(b):
    for kh in range(k):
      rows = slice(starts[kh] * block, starts[kh] * block + num_tokens[i, kh])
      out[i, kh * g:(kh + 1) * g] = attention_oracle(q_BxHxD[i, kh * g:(kh + 1) * g],
                                                     k_BxNxD[i, rows], v_BxNxD[i, rows])
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_matches_oracle_on_flat_buffer(backend, dtype):
  """Heads of different sizes in one buffer (head dim 24); counts empty, at block boundaries,
  full."""
  k, g, d = 4, 2, 24
  kf, vf, tables, starts = moa_like_layout(3, k, d, dtype, [1, 3, 2, 3])
  num_tokens = np.array([[0, BS - 1, BS, 3 * BS],      # empty, boundaries, full list
                         [1, BS + 1, 2 * BS, 0],
                         [BS, 3 * BS, BS + 1, 2 * BS - 1]])
  q = normal(12, (3, k * g, d), dtype)
  out = block_sparse_decode(q, kf, vf, tables, jnp.asarray(num_tokens), block_size=BS,
                            num_splits=2, backend=backend)
  assert_close(out, flat_oracle(q, kf, vf, starts, num_tokens), dtype)


def test_block_sparse_reference_matches_oracle():
  """The jnp reference (the xla path of the flat caches) attends to each head's own rows."""
  k, g, d = 3, 2, 32
  kf, vf, tables, starts = moa_like_layout(2, k, d, jnp.float32, [2, 1, 3])
  num_tokens = np.array([[20, 9, 48], [32, 0, 1]])
  q = normal(13, (2, k * g, d), jnp.float32)
  with jax.default_matmul_precision("highest"):
    out = block_sparse_decode_ref(q, kf, vf, tables, jnp.asarray(num_tokens), block_size=BS)
  np.testing.assert_allclose(out, flat_oracle(q, kf, vf, starts, num_tokens), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_over_dense_cache_equals_dense_oracle(backend):
  """Per-head tables over `[B, N, K, D]`, every block listed in order == dense masked."""
  b, s, k, g, d = 2, 4 * BS, 2, 2, 128
  q, kc, vc = (normal(i, shape, jnp.float32) for i, shape in
               enumerate([(b, k * g, d), (b, s, k, d), (b, s, k, d)]))
  lengths = [BS + 1, s]
  tables = range_tables(jnp.zeros((b, k), jnp.int32), s // BS)
  counts = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32)[:, None], (b, k))
  out = block_sparse_decode(q, kc, vc, tables, counts, block_size=BS, backend=backend)
  assert_close(out, dense_oracle(q, kc, vc, lengths), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlisted_blocks_are_never_used(backend):
  """NaNs in every block outside the lists (and past the counts) do not reach the output."""
  k, g, d = 2, 2, 32
  kf, vf, tables, starts = moa_like_layout(1, k, d, jnp.float32, [2, 2])
  poison = jnp.zeros((1, 6 * BS, d)).at[:, 4 * BS:].set(jnp.nan)
  kf, vf = (jnp.concatenate([x, jnp.zeros((1, 2 * BS, d))], axis=1) + poison for x in (kf, vf))
  num_tokens = np.array([[BS + 3, 2 * BS]])
  kf = kf.at[:, BS + 3:2 * BS].set(jnp.nan)  # past head 0's count, inside its last block
  q = normal(14, (1, k * g, d), jnp.float32)
  out = block_sparse_decode(q, kf, vf, tables, jnp.asarray(num_tokens), block_size=BS,
                            backend=backend)
  assert_close(out, flat_oracle(q, kf, vf, starts, num_tokens), jnp.float32)


# -------------------------------------------------------------------------------------------
# Quantized K/V: the kernels dequantize codes and scales as they load them. The oracle attends
# to values that NumPy computes from the same codes and scales (unpacking int4 nibbles itself).

QBS = 32  # block size: on TPU, 1-byte codes tile by 32 rows
# (mode, values per scale (0: per head), KV heads, query heads per KV head, head dim, q dtype)
QUANT = {"int8-gqa-d64-bf16": ("int8", 0, 2, 4, 64, jnp.bfloat16),
         "fp8-g16-mqa-d32-f32": ("fp8", 16, 1, 8, 32, jnp.float32),
         # groups of 8 straddle the halves (12 + 12) that int4's nibbles hold
         "int4-g8-gqa-d24-f32": ("int4", 8, 2, 4, 24, jnp.float32),
         "int4-mha-d128-bf16": ("int4", 0, 3, 1, 128, jnp.bfloat16)}


def random_codes(seed, shape, mode, group):
  """Random codes and bfloat16 scales for values of `shape`, as the kernels read them, and the
  float64 values they stand for."""
  rng = np.random.default_rng(seed)
  *lead, d = shape
  if mode == "fp8":
    stored = np.clip(rng.normal(0, 100, shape), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    codes = stored.astype(np.float64)
  else:
    ints = rng.integers(-127 if mode == "int8" else -7, 128 if mode == "int8" else 8, shape)
    codes = ints.astype(np.float64)
    stored = ints.astype(np.int8)
    if mode == "int4":  # byte j: value j in the low nibble, value j + D/2 in the high one
      nibbles = ints.astype(np.uint8) & 0xF
      stored = (nibbles[..., :d // 2] | (nibbles[..., d // 2:] << 4)).view(np.int8)
  groups = d // (group or d)
  scales = (rng.uniform(0.5, 1.5, (*lead, groups)) / np.abs(codes).max()).astype(
      ml_dtypes.bfloat16)
  values = codes.reshape(*lead, groups, -1) * scales.astype(np.float64)[..., None]
  return QuantizedKV(jnp.asarray(stored), jnp.asarray(scales), mode), values.reshape(shape)


def quant_inputs(spec, b, rows_shape):
  """q, K/V codes and scales, K/V values for a `QUANT` spec and K/V rows `[..., B, S(, K)]`."""
  mode, group, k, g, d, dtype = spec
  (kq, k_values), (vq, v_values) = (random_codes(seed, (*rows_shape, d), mode, group)
                                    for seed in (1, 2))
  return normal(0, (b, k * g, d), dtype), kq, vq, k_values, v_values


@pytest.mark.parametrize("fmt", QUANT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_shared_kv_decode_matches_oracle(backend, fmt):
  """Lengths empty, at block boundaries and full; a partial last block (on TPU its DMA is
  rounded up to the 32-row tile and reads NaN scales past the end); splits over a head's
  blocks."""
  k, dtype = QUANT[fmt][2], QUANT[fmt][5]
  s = 3 * QBS - 5
  lengths = [0, 1, QBS - 1, QBS, QBS + 1, s]
  q, kq, vq, k_values, v_values = quant_inputs(QUANT[fmt], len(lengths), (len(lengths), s, k))
  out = shared_kv_decode(q, kq, vq, jnp.asarray(lengths, jnp.int32), block_size=QBS,
                         num_splits=2, backend=backend)
  assert_close(out, dense_oracle(q, k_values, v_values, lengths), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_stack_is_read_at_its_index(backend):
  lengths = [5, 2 * QBS]
  spec = QUANT["int4-g8-gqa-d24-f32"]
  q, kq, vq, k_values, v_values = quant_inputs(spec, 2, (3, 2, 2 * QBS, spec[2]))
  read = jax.jit(functools.partial(shared_kv_decode, block_size=QBS, backend=backend))
  for layer in (0, 2):
    out = read(q, kq, vq, jnp.asarray(lengths, jnp.int32), stack_index=jnp.int32(layer))
    assert_close(out, dense_oracle(q, k_values[layer], v_values[layer], lengths), jnp.float32)


QUANT_FLAT = {"int4-g8": ("int4", 8, 3, 2, 24, jnp.bfloat16),
              "fp8": ("fp8", 0, 3, 2, 32, jnp.float32)}
FLAT_SIZES = [1, 3, 2]  # blocks per KV head
FLAT_COUNTS = np.array([[0, QBS - 1, 2 * QBS], [QBS, 3 * QBS, 1]])


def quant_flat_inputs(fmt):
  starts = np.concatenate([[0], np.cumsum(FLAT_SIZES)[:-1]])
  q, kq, vq, k_values, v_values = quant_inputs(QUANT_FLAT[fmt], 2, (2, sum(FLAT_SIZES) * QBS))
  tables = range_tables(jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (2, 3)),
                        max(FLAT_SIZES))
  want = flat_oracle(q, k_values, v_values, starts, FLAT_COUNTS, block=QBS)
  return q, kq, vq, tables, want


@pytest.mark.parametrize("fmt", QUANT_FLAT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_block_sparse_matches_oracle_on_flat_buffer(backend, fmt):
  q, kq, vq, tables, want = quant_flat_inputs(fmt)
  out = block_sparse_decode(q, kq, vq, tables, jnp.asarray(FLAT_COUNTS), block_size=QBS,
                            num_splits=2, backend=backend)
  assert_close(out, want, QUANT_FLAT[fmt][5])


def test_references_dequantize_then_attend():
  """The jnp references (the xla path) read quantized K/V as the values they stand for."""
  q, kq, vq, tables, want = quant_flat_inputs("fp8")
  lengths = [3, 2 * QBS]
  spec = QUANT["int4-g8-gqa-d24-f32"]
  qd, kd, vd, k_values, v_values = quant_inputs(spec, 2, (2, 2 * QBS, spec[2]))
  with jax.default_matmul_precision("highest"):
    flat = block_sparse_decode_ref(q, kq, vq, tables, jnp.asarray(FLAT_COUNTS), block_size=QBS)
    dense = shared_kv_decode_ref(qd, kd, vd, jnp.asarray(lengths))
  np.testing.assert_allclose(flat, want, atol=1e-5)
  np.testing.assert_allclose(dense, dense_oracle(qd, k_values, v_values, lengths), atol=1e-5)


# -------------------------------------------------------------------------------------------
# Eligibility: one line saying why not, per platform, layout and shape.

ELIGIBILITY = [
    # platform, layout, (H, K, D, rows, dtype, block_size), reason fragment ("" = eligible)
    ("cuda", "dense", (8, 2, 24, 500, "float32", None), ""),
    ("gpu", "stacked", (9, 3, 80, 512, "bfloat16", None), ""),
    ("tpu", "dense", (9, 3, 64, 500, "bfloat16", None), ""),
    ("tpu", "stacked", (12, 12, 24, 5, "float32", None), ""),
    ("tpu", "flat", (9, 3, 64, 3 * 256, "bfloat16", 64), ""),
    ("tpu", "dense_blocks", (8, 2, 128, 256, "float32", 64), ""),
    ("cuda", "dense_blocks", (8, 2, 64, 256, "float32", 64), ""),
    ("cpu", "dense", (8, 2, 64, 256, "float32", None), "no Pallas kernel backend on CPU"),
    ("rocm", "dense", (8, 2, 64, 256, "float32", None), "no Pallas decode kernel for platform"),
    ("tpu", "dense", (8, 2, 64, 256, "float16", None), "cache dtype float16 is not supported"),
    ("cuda", "paged", (8, 2, 64, 256, "float32", None), "unknown cache layout 'paged'"),
    ("cuda", "dense", (6, 4, 64, 256, "float32", None), "must be a multiple of KV heads"),
    ("cuda", "flat", (8, 2, 64, 256, "float32", 24), "power of two >= 16"),
    ("cuda", "dense", (8, 2, 512, 256, "bfloat16", None), "head_dim 512 exceeds 256"),
    ("tpu", "flat", (8, 2, 64, 200, "float32", 64), "rows (200) must be a whole number"),
    ("tpu", "dense_blocks", (8, 2, 64, 256, "float32", 64), "need head_dim % 128 == 0"),
]


@pytest.mark.parametrize("platform, layout, shape, reason", ELIGIBILITY,
                         ids=[f"{p}-{lay}-{r[:12] or 'ok'}" for p, lay, _, r in ELIGIBILITY])
def test_eligibility(platform, layout, shape, reason):
  h, k, d, rows, dtype, block_size = shape
  verdict = eligibility(platform, layout, num_heads=h, num_kv_heads=k, head_dim=d, rows=rows,
                        dtype=dtype, block_size=block_size)
  assert verdict.ok == (not reason)
  assert reason in verdict.reason and "\n" not in verdict.reason


QUANT_ELIGIBILITY = [
    # platform, layout, (H, K, D, rows, dtype, block_size), (mode, group), reason fragment
    ("tpu", "dense", (8, 2, 64, 96, "bfloat16", None), ("int8", 0), ""),
    ("tpu", "stacked", (8, 2, 64, 96, "float32", None), ("fp8", 16), ""),
    ("tpu", "flat", (8, 2, 24, 256, "bfloat16", 64), ("int4", 8), ""),
    ("cuda", "flat", (8, 2, 24, 250, "float32", 16), ("int4", 8), ""),
    ("cuda", "dense_blocks", (8, 2, 64, 256, "bfloat16", 64), ("fp8", 0), ""),
    ("cuda", "dense", (8, 2, 64, 256, "bfloat16", None), ("int2", 0), "unknown code format"),
    ("cuda", "dense", (8, 2, 24, 256, "bfloat16", None), ("int4", 16), "must divide head_dim"),
    ("tpu", "dense", (8, 2, 64, 100, "bfloat16", None), ("int8", 0), ""),  # a rounded-up tail
    ("tpu", "dense", (8, 2, 64, 256, "bfloat16", 16), ("int8", 0), "in multiples of 32"),
    ("tpu", "flat", (8, 2, 64, 256, "bfloat16", 16), ("int4", 0), "in multiples of 32"),
    ("tpu", "dense_blocks", (8, 2, 128, 256, "float32", 64), ("int8", 0), "narrower than 128"),
]


@pytest.mark.parametrize("platform, layout, shape, quant, reason", QUANT_ELIGIBILITY,
                         ids=[f"{p}-{lay}-{q[0]}-{r[:12] or 'ok'}"
                              for p, lay, _, q, r in QUANT_ELIGIBILITY])
def test_quantized_eligibility(platform, layout, shape, quant, reason):
  h, k, d, rows, dtype, block_size = shape
  verdict = eligibility(platform, layout, num_heads=h, num_kv_heads=k, head_dim=d, rows=rows,
                        dtype=dtype, block_size=block_size, quant=quant[0], group=quant[1])
  assert verdict.ok == (not reason)
  assert reason in verdict.reason and "\n" not in verdict.reason


def test_kernels_refuse_what_eligibility_refuses():
  """The wrappers raise the eligibility reason for their backend, and reject unknown backends."""
  q, kc = jnp.zeros((1, 4, 64)), jnp.zeros((1, 32, 2, 64))
  with pytest.raises(ValueError, match="power of two >= 16"):
    shared_kv_decode(q, kc, kc, jnp.array([3]), block_size=24)
  with pytest.raises(ValueError, match="backend must be one of triton, mosaic_tpu"):
    shared_kv_decode(q, kc, kc, jnp.array([3]), backend="cuda")
  with pytest.raises(ValueError, match="must be a multiple of KV heads"):
    shared_kv_decode(jnp.zeros((1, 3, 64)), kc, kc, jnp.array([3]))
  with pytest.raises(ValueError, match="need head_dim % 128 == 0 on tpu"):
    block_sparse_decode(q, kc, kc, jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                        block_size=16, backend="mosaic_tpu")
  with pytest.raises(ValueError, match="must agree on"):
    block_sparse_decode(q, jnp.zeros((1, 32, 64)), jnp.zeros((1, 32, 64)),
                        jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32))
  codes = QuantizedKV(jnp.zeros((1, 32, 2, 32), jnp.int8), jnp.zeros((1, 32, 2, 1)), "int4")
  with pytest.raises(ValueError, match="in multiples of 32"):
    shared_kv_decode(q, codes, codes, jnp.array([3]), block_size=16, backend="mosaic_tpu")
  with pytest.raises(ValueError, match="must share a code format"):
    shared_kv_decode(q, codes, QuantizedKV(codes.codes, jnp.zeros((1, 32, 2, 2)), "int4"),
                     jnp.array([3]))


# -------------------------------------------------------------------------------------------
# Cross-lowering from the CPU: the real Triton / Mosaic shape rules, which interpret mode skips,
# for every cache layout of every shipped config, in bf16 and f32.

PLATFORM_BACKEND = {"cuda": "triton", "tpu": "mosaic_tpu"}


# Quantized caches in one value dtype, the code formats taking turns over a config's cases.
QUANT_LOWERING = (("int8", 0), ("fp8", 0), ("int4", 8))


@functools.cache
def lower(platform, case, dtype, quant=None):
  fn, args = abstract_call(case, dtype, PLATFORM_BACKEND[platform], quant=quant)
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_is_eligible_and_lowers(path):
  """Every cache layout of every config in configs/: a new config is covered without anyone
  listing it here."""
  for case in config_cases(kvjax.load_config(path).model):
    for platform in PLATFORM_BACKEND:
      for dtype in ("float32", "bfloat16"):
        verdict = eligibility(platform, case.layout, num_heads=case.num_heads,
                              num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                              rows=case.rows, dtype=dtype, block_size=case.block_size)
        assert verdict.ok, (case, platform, dtype, verdict.reason)
        assert "blocked_decode" in lower(platform, case, dtype)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_is_eligible_and_lowers_with_a_quantized_cache(path):
  """Every config's layouts with codes and scales (bf16 values)."""
  for i, case in enumerate(config_cases(kvjax.load_config(path).model)):
    quant = QUANT_LOWERING[i % len(QUANT_LOWERING)]
    for platform in PLATFORM_BACKEND:
      verdict = eligibility(platform, case.layout, num_heads=case.num_heads,
                            num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                            rows=case.rows, dtype="bfloat16", block_size=case.block_size,
                            quant=quant[0], group=quant[1])
      assert verdict.ok, (case, platform, quant, verdict.reason)
      assert "blocked_decode" in lower(platform, case, "bfloat16", quant)


# -------------------------------------------------------------------------------------------
# The decode loop through the model's attention entry point.


INT4_G8 = ("model.kv_quant.mode=int4", "model.kv_quant.group_size=8")


@pytest.mark.parametrize("entries", [(), INT4_G8, (*INT4_G8, "model.kv_quant.rotate=true")],
                         ids=["float", "int4-g8", "int4-g8-rotated"])
def test_generate_tokens_identical_with_xla_and_pallas(entries):
  """GQA with cross-layer sharing: consumer layers read their producer's cache too. From a
  quantized cache the kernel reads the codes and scales (two per head) that the jnp path
  dequantizes; rotated codes with a rotated query, the jnp path rotating the values back."""
  overrides = ("model.kv_sharing.factor=2", *entries)
  prompts = random_tokens(2, 7, seed=3)
  lengths = np.array([7, 4])
  outs = []
  for impl in ("xla", "pallas"):
    cfg, model, params = tiny_model(*overrides, f"model.attention_impl={impl}")
    outs.append(generate(model, params, prompts, lengths, max_new_tokens=6,
                         rng=jax.random.key(0), cache=init_cache(cfg.model, 2, 16),
                         sampling=SamplingConfig()))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)


# -------------------------------------------------------------------------------------------
# `model.attention_impl=auto`: the kernels where the config's cache meets their rules.


@pytest.mark.parametrize("overrides, platform, impl", [
    ((), "cuda", "pallas"),
    ((), "tpu", "pallas"),
    ((), "cpu", "xla"),
    (("model.scan_layers=true",), "tpu", "pallas"),  # the stack, read in place
    (("model.eviction.policy=h2o",), "cuda", "pallas"),  # compacted flat rows, 64-row blocks
    (("model.head_dim=288",), "cuda", "xla"),  # beyond the Triton kernel's shared-memory blocks
    (("model.cache_dtype=float16",), "tpu", "xla"),
    (("model.kv_quant.mode=int4", "model.kv_quant.group_size=8"), "tpu", "pallas"),
    (("model.kv_quant.mode=fp8", "model.eviction.policy=h2o"), "tpu", "pallas"),
])
def test_auto_picks_the_kernel_only_where_it_applies(overrides, platform, impl):
  cfg = kvjax.load_config(None, ["model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
                                 *overrides]).model
  e = registry.kernel_eligibility(cfg, platform)
  assert ("pallas" if e.ok else "xla") == impl
  assert e.ok == (e.reason == "") and "\n" not in e.reason
  if platform == "cpu":  # this machine: auto falls back, and says why
    assert registry.attention_choice(cfg) == ("xla", f"auto: {e.reason}")
