"""MoA decode cache: ring buffers with sinks == the full forward under the same masks."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache.dense import DenseLayout
from kvjax.cache.storage import PlainStorage
from kvjax.decode import generate, init_cache
from kvjax.layers.cache import KVCache
from kvjax.layers.dot_product import dot_product_attention
from kvjax.moa.masks import decode_mask, prefill_mask
from kvjax.moa.plan import Plan
from tests.helpers import TINY, random_tokens

P, G = 37, 20  # prompt and generated tokens: N = 57, block 8, sink 4
# GQA (4 query heads, 2 KV heads) with mixed rules inside a group; spans 8..57.
PLAN = Plan(alphas=((16.0, 0.0, 24.0, 8.0), (40.0, 16.0, 0.0, 100.0)),
            betas=((0.0, 0.3, 0.0, 0.5), (0.0, 0.0, 0.2, 0.0)))
UNIFORM = Plan(alphas=((40.0,) * 4,) * 2, betas=((0.0,) * 4,) * 2)  # 48 slots at block 16


def build(tmp_path, plan, *extra, block=8):
  path = tmp_path / "plan.json"
  plan.save(path)
  cfg = kvjax.load_config(None, [*TINY, "model.max_seq_len=128", f"model.moa.plan={path}",
                                 f"model.moa.block_size={block}", "model.moa.sink_tokens=4",
                                 *extra])
  model = kvjax.build_model(cfg.model)
  return cfg, model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


@flax.struct.dataclass
class MaskedFullCache(DenseLayout):
  """Reference: every token kept; a query before `prompt_len` sees the prefill mask, a later
  one the decode mask, both from the plan at the same N."""

  num_local: tuple = flax.struct.field(pytree_node=False, default=())
  windows: tuple = flax.struct.field(pytree_node=False, default=())
  block: int = flax.struct.field(pytree_node=False, default=0)
  sink: int = flax.struct.field(pytree_node=False, default=0)
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)

  def attend(self, q_BxTxHxD, chunk):
    positions_BxT = chunk.positions
    b, t = positions_BxT.shape
    slots_BxS = jnp.broadcast_to(jnp.arange(self.max_len), (b, self.max_len))
    pre_HxSxS = prefill_mask(self.max_len, self.num_local, self.block, self.sink)
    pre_BxHxTxS = jnp.asarray(pre_HxSxS)[None][:, :, positions_BxT[0]]
    dec_BxHxTxS = decode_mask(positions_BxT, slots_BxS, self.windows, self.sink)
    in_prompt = (positions_BxT < self.prompt_len)[:, None, :, None]
    mask = jnp.where(in_prompt, pre_BxHxTxS, dec_BxHxTxS)
    return dot_product_attention(q_BxTxHxD, self.k, self.v, mask), self


def reference_cache(cfg, plan, batch, n, prompt_len):
  """The plan's masks at final length `n`, computed here from its rules (sizes rounded up to
  blocks, windows = size - sink, prefill bands = the windows in blocks)."""
  shape = (batch, n, cfg.num_kv_heads, cfg.head_dim_)
  block, sink = cfg.moa.block_size, cfg.moa.sink_tokens
  layers = []
  for alphas, betas in zip(plan.alphas, plan.betas):
    spans = [np.floor(a + b * n) for a, b in zip(alphas, betas)]
    sizes = [int(-(-max(min(s, n), 2 * block) // block) * block) for s in spans]
    layers.append(MaskedFullCache(
        jnp.zeros(shape), jnp.zeros(shape), PlainStorage(), "xla",
        num_local=tuple(-(-(s - sink) // block) for s in sizes),
        windows=tuple(s - sink for s in sizes), block=block, sink=sink, prompt_len=prompt_len))
  return KVCache(layers=tuple(layers), max_len=n)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_ring_buffer_decode_equals_full_forward_under_the_same_mask(tmp_path, impl):
  # The kernel needs one size per KV group and blocks of >= 16 (Triton's shape rules).
  plan, block = (PLAN, 8) if impl == "xla" else (UNIFORM, 16)
  cfg, model, params = build(tmp_path, plan, f"model.attention_impl={impl}", block=block)
  tokens = random_tokens(2, P + G, seed=3)
  n = P + G
  positions = jnp.broadcast_to(jnp.arange(n), (2, n))
  apply = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, positions=pos, cache=c))
  want, _ = apply(params, tokens, positions, reference_cache(cfg.model, plan, 2, n, P))

  logits, cache = apply(params, tokens[:, :P], positions[:, :P], init_cache(cfg.model, 2, n))
  got = [logits]
  for i in range(P, n):
    logits, cache = apply(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=2e-4)


def test_cache_bytes_are_the_sum_of_per_head_sizes(tmp_path):
  cfg, _, _ = build(tmp_path, PLAN)
  cache = init_cache(cfg.model, 3, P + G)
  # N = 57, block 8: layer 0 spans 16, 17, 24, 36 -> sizes 16, 24, 24, 40 -> KV heads 24, 40;
  # layer 1 spans 40, 16, 11, 100 -> sizes 40, 16, 16, 64 (57 rounded up) -> KV heads 40, 64.
  per_token = 2 * cfg.model.head_dim_ * 4  # K and V, float32
  assert [layer.k.shape[1] for layer in cache.layers] == [24 + 40, 40 + 64]
  lengths = 2 * 3 * 4  # every layer's int32 prompt lengths
  assert cache.nbytes == 3 * per_token * (24 + 40 + 40 + 64) + lengths
  dense = init_cache(dataclasses.replace(cfg.model, moa=dataclasses.replace(cfg.model.moa,
                                                                            plan="")), 3, P + G)
  assert cache.nbytes < dense.nbytes


def test_generate_with_right_padded_prompts_keeps_the_real_tokens(tmp_path):
  """Pads must not displace prompt tokens from the rings: a short prompt padded in a batch
  generates what it generates alone, with the same final length N."""
  cfg, model, params = build(tmp_path, PLAN)
  prompts = random_tokens(2, P, seed=5)
  lengths = np.array([P, 29])
  batch = generate(model, params, prompts, lengths, max_new_tokens=G, rng=jax.random.key(0),
                   cache=init_cache(cfg.model, 2, P + G))
  alone = generate(model, params, prompts[1:, :29], lengths[1:], max_new_tokens=G,
                   rng=jax.random.key(0), cache=init_cache(cfg.model, 1, P + G))
  np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])


def test_chunked_generation_equals_generate(tmp_path):
  """Prefill in chunks smaller than the prompt (the long-context eval's) of right-padded prompts
  decodes what one write decodes: the ring cache gets the prompt in one write and its length."""
  cfg, model, params = build(tmp_path, PLAN)
  params = jax.tree.map(lambda x: 6 * x, params)  # sharp attention: tokens depend on the cache
  prompts = np.asarray(random_tokens(2, P, seed=6))
  lengths = np.array([P, 29], np.int32)
  want = generate(model, params, prompts, lengths, max_new_tokens=G, rng=jax.random.key(0),
                  cache=init_cache(cfg.model, 2, P + G))
  got = generate(model, params, prompts, lengths, max_new_tokens=G, rng=jax.random.key(0),
                 cache=init_cache(cfg.model, 2, P + G), chunk=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)
