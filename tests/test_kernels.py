"""Pallas decode kernels: interpret mode == jnp reference, cross-lowering, the decode loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.decode import SamplingConfig, generate, init_cache
from kvjax.pallas_kernels import block_sparse_decode, range_tables, shared_kv_decode
from kvjax.pallas_kernels.block_sparse_decode_ref import block_sparse_decode_ref
from kvjax.pallas_kernels.shared_kv_decode_ref import shared_kv_decode_ref
from tests.helpers import random_tokens, tiny_model

# Jitted once per shape: eager op-by-op dispatch costs more than the work at these sizes.
shared_kv_decode_ref = jax.jit(shared_kv_decode_ref)
block_sparse_decode_ref = jax.jit(block_sparse_decode_ref, static_argnames="block_size")

BS = 16  # block size in interpret-mode tests
BOUNDARY_LENGTHS = (0, 1, BS - 1, BS, BS + 1)
BACKENDS = ("triton", "mosaic_tpu")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# (KV heads, query heads per KV head, head dim): GQA, MQA (CLA buffers are MQA/GQA too), MHA.
HEADS = {"gqa4": (2, 4, 32), "mqa8": (1, 8, 64), "mha": (3, 1, 32)}


def normal(seed, shape, dtype):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def assert_close(out, ref, dtype):
  assert out.shape == ref.shape and out.dtype == ref.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=TOL[dtype], rtol=TOL[dtype])


# Every head layout and dtype in each backend; split counts from one to more splits than blocks.
CASES = [("triton", "gqa4", jnp.float32, 2), ("triton", "mqa8", jnp.bfloat16, 8),
         ("triton", "mha", jnp.float32, 1), ("mosaic_tpu", "gqa4", jnp.bfloat16, 3),
         ("mosaic_tpu", "mqa8", jnp.float32, 1), ("mosaic_tpu", "mha", jnp.bfloat16, 2)]


@pytest.mark.parametrize("backend, heads, dtype, splits", CASES,
                         ids=[f"{b}-{h}-{jnp.dtype(t).name}-p{p}" for b, h, t, p in CASES])
def test_shared_kv_decode_matches_reference(backend, heads, dtype, splits):
  """Lengths at block boundaries (0 gives zeros) and a full cache of a non-block-multiple size."""
  k, g, d = HEADS[heads]
  s = 3 * BS - 8
  lengths = jnp.array([*BOUNDARY_LENGTHS, s], jnp.int32)
  b = lengths.shape[0]
  q, kc, vc = (normal(i, shape, dtype) for i, shape in
               enumerate([(b, k * g, d), (b, s, k, d), (b, s, k, d)]))
  out = shared_kv_decode(q, kc, vc, lengths, block_size=BS, num_splits=splits, backend=backend)
  assert_close(out, shared_kv_decode_ref(q, kc, vc, lengths), dtype)
  np.testing.assert_array_equal(out[0], 0.0)


def moa_like_layout(b, k, d, dtype, sizes_blocks):
  """A flat `[B, N, D]` buffer where head h owns a contiguous run of `sizes_blocks[h]` blocks."""
  starts = np.concatenate([[0], np.cumsum(sizes_blocks)[:-1]])
  n = int(np.sum(sizes_blocks)) * BS
  kf, vf = normal(10, (b, n, d), dtype), normal(11, (b, n, d), dtype)
  tables = range_tables(jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (b, k)),
                        int(max(sizes_blocks)))
  return kf, vf, tables, starts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_matches_reference_on_flat_buffer(backend, dtype):
  """Heads of different sizes in one buffer; counts empty, at block boundaries and full."""
  k, g, d = 4, 2, 32
  sizes = [1, 3, 2, 3]
  kf, vf, tables, _ = moa_like_layout(3, k, d, dtype, sizes)
  num_tokens = jnp.array([[0, BS - 1, BS, 3 * BS],      # empty, boundaries, full list
                          [1, BS + 1, 2 * BS, 0],
                          [BS, 3 * BS, BS + 1, 2 * BS - 1]], jnp.int32)
  q = normal(12, (3, k * g, d), dtype)
  out = block_sparse_decode(q, kf, vf, tables, num_tokens, block_size=BS, num_splits=2,
                            backend=backend)
  assert_close(out, block_sparse_decode_ref(q, kf, vf, tables, num_tokens, block_size=BS), dtype)


def numpy_attention(q_GxD, k_TxD, v_TxD):
  """Softmax attention in float64 NumPy: an oracle that shares no code with kvjax."""
  if not len(k_TxD):
    return np.zeros_like(q_GxD)
  logits = q_GxD @ k_TxD.T / np.sqrt(q_GxD.shape[-1])
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (p / p.sum(axis=-1, keepdims=True)) @ v_TxD


def test_block_sparse_reference_equals_per_head_attention():
  """The reference attends exactly to each head's own first `num_tokens` rows."""
  k, g, d = 3, 2, 32
  sizes = [2, 1, 3]
  kf, vf, tables, starts = moa_like_layout(2, k, d, jnp.float32, sizes)
  num_tokens = np.array([[20, 9, 48], [32, 0, 1]])
  q = normal(13, (2, k * g, d), jnp.float32)
  out = block_sparse_decode_ref(q, kf, vf, tables, jnp.asarray(num_tokens), block_size=BS)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, kf, vf))
  for b in range(2):
    for h in range(k):
      rows = slice(starts[h] * BS, starts[h] * BS + num_tokens[b, h])
      want = numpy_attention(q64[b, h * g:(h + 1) * g], k64[b, rows], v64[b, rows])
      np.testing.assert_allclose(out[b, h * g:(h + 1) * g], want, atol=1e-5)


def test_block_sparse_over_dense_cache_equals_shared_kv_reference():
  """All blocks listed in order == the dense kernel's contract (sparse == dense masked)."""
  b, s, k, g, d = 3, 4 * BS, 2, 4, 32
  q, kc, vc = (normal(i, shape, jnp.float32) for i, shape in
               enumerate([(b, k * g, d), (b, s, k, d), (b, s, k, d)]))
  lengths = jnp.array([0, BS + 1, s], jnp.int32)
  tables = range_tables(jnp.zeros((b, k), jnp.int32), s // BS)
  out = block_sparse_decode(q, kc, vc, tables, jnp.broadcast_to(lengths[:, None], (b, k)),
                            block_size=BS)
  np.testing.assert_allclose(out, shared_kv_decode_ref(q, kc, vc, lengths), atol=2e-5)


def test_unlisted_blocks_are_never_used():
  """NaNs in every block outside the lists (and past the counts) do not reach the output."""
  k, g, d = 2, 2, 32
  kf, vf, tables, _ = moa_like_layout(1, k, d, jnp.float32, [2, 2])
  poison = jnp.zeros((1, 6 * BS, d)).at[:, 4 * BS:].set(jnp.nan)
  kf, vf = (jnp.concatenate([x, jnp.zeros((1, 2 * BS, d))], axis=1) + poison for x in (kf, vf))
  num_tokens = jnp.array([[BS + 3, 2 * BS]], jnp.int32)
  kf = kf.at[:, BS + 3:2 * BS].set(jnp.nan)  # past head 0's count, inside its last block
  q = normal(14, (1, k * g, d), jnp.float32)
  out = block_sparse_decode(q, kf, vf, tables, num_tokens, block_size=BS)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(
      out, block_sparse_decode_ref(q, jnp.nan_to_num(kf), vf, tables, num_tokens, block_size=BS),
      atol=2e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=24), "power of two >= 16"),
    (dict(block_size=8), "power of two >= 16"),
    (dict(backend="cuda"), "backend must be one of triton, mosaic_tpu"),
])
def test_bad_options_are_rejected(kwargs, match):
  q, kc = jnp.zeros((1, 4, 32)), jnp.zeros((1, 32, 2, 32))
  with pytest.raises(ValueError, match=match):
    shared_kv_decode(q, kc, kc, jnp.array([3]), **kwargs)


def test_bad_shapes_are_rejected():
  q = jnp.zeros((1, 6, 32))
  with pytest.raises(ValueError, match="multiple of KV heads"):
    shared_kv_decode(q, jnp.zeros((1, 32, 4, 32)), jnp.zeros((1, 32, 4, 32)), jnp.array([3]))
  with pytest.raises(ValueError, match="must agree on"):
    block_sparse_decode(q, jnp.zeros((1, 32, 32)), jnp.zeros((1, 32, 32)),
                        jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32))


# -------------------------------------------------------------------------------------------
# Cross-lowering from the CPU: the real Triton / Mosaic shape rules, which interpret mode skips.

PLATFORM_BACKEND = {"cuda": "triton", "tpu": "mosaic_tpu"}


def lowers(fn, platform, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert "custom_call" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(8, 8), (1, 32), (4, 1)], ids=["gqa8", "mqa32", "mha"])
@pytest.mark.parametrize("platform", list(PLATFORM_BACKEND))
def test_kernels_cross_lower(platform, heads, dtype):
  k, g = heads
  b, s, d = 2, 1000, 128
  sds = jax.ShapeDtypeStruct
  opts = dict(backend=PLATFORM_BACKEND[platform], interpret=False)
  q = sds((b, k * g, d), dtype)
  lowers(functools.partial(shared_kv_decode, **opts), platform, q, sds((b, s, k, d), dtype),
         sds((b, s, k, d), dtype), sds((b,), jnp.int32))
  lowers(functools.partial(block_sparse_decode, **opts), platform, q, sds((b, 4096, d), dtype),
         sds((b, 4096, d), dtype), sds((b, k, 16), jnp.int32), sds((b, k), jnp.int32))


def test_tpu_lowering_rejects_narrow_heads_in_a_dense_cache():
  """Mosaic needs 128-lane blocks: the dense view with D=64 and K>1 must fail loudly."""
  sds = jax.ShapeDtypeStruct
  f = functools.partial(shared_kv_decode, backend="mosaic_tpu", interpret=False)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    lowers(f, "tpu", sds((1, 4, 64), jnp.float32), sds((1, 256, 2, 64), jnp.float32),
           sds((1, 256, 2, 64), jnp.float32), sds((1,), jnp.int32))


# -------------------------------------------------------------------------------------------
# The decode loop through the model's attention entry point.


def test_generate_tokens_identical_with_xla_and_pallas():
  """GQA with cross-layer sharing: consumer layers read their producer's cache too."""
  sharing = ("model.kv_sharing.factor=2",)
  prompts = random_tokens(2, 7, seed=3)
  lengths = np.array([7, 4])
  outs = []
  for impl in ("xla", "pallas"):
    cfg, model, params = tiny_model(*sharing, f"model.attention_impl={impl}")
    outs.append(generate(model, params, prompts, lengths, max_new_tokens=6,
                         rng=jax.random.key(0), cache=init_cache(cfg.model, 2, 16),
                         sampling=SamplingConfig()))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
