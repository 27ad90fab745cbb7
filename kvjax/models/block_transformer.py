"""Block Transformer (arXiv 2406.02657): global attention between blocks, local attention within.

A sequence is cut into blocks of L tokens. The lookup embedder concatenates the L token
embeddings of a block (each d/L wide) into one block embedding. The block decoder, a causal
transformer over block embeddings, turns blocks 0..i-1 into the context of block i: its position 0
holds a learned start embedding and position i + 1 holds block i, so its output at position i has
seen exactly the blocks before block i. The token decoder decodes block i from R prefix vectors
projected from that context, and its attention never leaves the block: it reads
`[P_1 .. P_R, x_0 .. x_{L-2}]` (local positions 0 .. R+L-2) and its output at local position
R-1+j predicts x_j. As in every kvjax model, `logits[:, t]` predicts token t + 1.

Generation keeps a cache over blocks for the block decoder and an R+L-1 slot cache for the token
decoder that is rewritten from slot 0 every block (`BlockCache`, below). `prefill` puts pad
tokens before every prompt so that it ends at a block boundary, as the paper does; training puts
0..L-1 pad tokens before every document so that such prompts are in distribution.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kvjax import registry
from kvjax.cache.dense import stacked_cache
from kvjax.config import ModelConfig
from kvjax.layers.cache import Cache, KVCache
from kvjax.layers.norms import RMSNorm
from kvjax.models.llama import Embedder, Transformer


@flax.struct.dataclass
class BlockCache(Cache):
  """The two-level cache.

  - `blocks`: the block decoder's cache over block positions: slot 0 holds the start embedding,
    slot i + 1 block i. Per token it holds 1/L of an entry, and each block decoder step reads
    1/L of the entries a token-level cache would. Eviction (`model.eviction`) compacts it.
  - `local`: the token decoder's dense cache, R + L - 1 slots (R prefix vectors, then the tokens
    of the current block before its last), independent of the sequence length. Every block
    rewrites it from slot 0; the causal mask by slot hides what is left of the previous block.

  Positions arrive in the prompt's own coordinates; `shift` (pad tokens put before each prompt
  so that it ends at a block boundary) maps them onto blocks.
  """

  blocks: Cache  # block decoder, one slot per block position
  local: Cache  # token decoder, R + L - 1 slots
  block_tokens: jax.Array  # B x L int32, the current block's tokens so far
  shift: jax.Array  # B int32, pad tokens before the prompt
  lengths: jax.Array  # B int32, prompt lengths (for prefill)
  max_len: int = flax.struct.field(pytree_node=False)  # positions (prompt + generated) it holds
  block_len: int = flax.struct.field(pytree_node=False)

  prefill_in_one_write = True  # the prompt is cut into blocks as a whole

  def with_prompt_lengths(self, prompt_lengths_B: jax.Array) -> BlockCache:
    return self.replace(lengths=prompt_lengths_B)

  def finish_prefill(self, room: int, rng: jax.Array) -> BlockCache:
    """`room` more tokens complete at most `room / L + 1` blocks."""
    return self.replace(blocks=self.blocks.finish_prefill(-(-room // self.block_len) + 1, rng))


def _arange(b: int, n: int, start=0) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) + jnp.asarray(start, jnp.int32)


class DecoderStack(Transformer):
  """The Llama decoder's blocks (any K/V sharing pattern) and final norm, run on embeddings:
  no token embedding, no head."""

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, cache=None):
    cfg = self.cfg
    x_BxTxE, cache = self._blocks(x_BxTxE, positions_BxT, cache)
    x_BxTxE = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                      name="final_norm")(x_BxTxE)
    return x_BxTxE, cache


class BlockTransformer(nn.Module):
  """`apply(params, tokens)` returns logits; with `positions=` and `cache=` it prefills (T > 1,
  every prompt T tokens long) or decodes one token; `prefill` takes per-sequence prompt lengths."""

  cfg: ModelConfig

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> BlockCache:
    """A fresh cache for `batch` sequences of up to `max_len` prompt and generated tokens."""
    if max_len > cfg.max_seq_len:
      raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    registry.validate(cfg)
    block, token_cfg = cfg.block, cfg.decoder("token_decoder")
    slots = token_cfg.max_seq_len
    if token_cfg.scan_layers:
      local = stacked_cache(token_cfg.num_kv_layers, batch, slots, token_cfg.num_kv_heads,
                            token_cfg.head_dim_, registry.storage(token_cfg),
                            registry.attention_impl(token_cfg))
    else:
      local = KVCache(layers=registry.dense_layouts(token_cfg, batch, slots), max_len=slots)
    return BlockCache(
        blocks=Transformer.init_cache(cfg.decoder("block_decoder"), batch,
                                      block.num_block_positions(max_len)),
        local=local, block_tokens=jnp.full((batch, block.block_len), block.pad_id, jnp.int32),
        shift=jnp.zeros((batch,), jnp.int32), lengths=jnp.full((batch,), max_len, jnp.int32),
        max_len=max_len, block_len=block.block_len)

  def setup(self):
    cfg = self.cfg
    block_cfg, token_cfg = cfg.decoder("block_decoder"), cfg.decoder("token_decoder")
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
    self.lookup = nn.Embed(cfg.vocab_size, block_cfg.d_model // cfg.block.block_len,
                           embedding_init=init(("vocab", "embed")), dtype=dtype,
                           param_dtype=param_dtype)
    self.start = self.param("start", init(("embed",)), (block_cfg.d_model,), param_dtype)
    self.block_decoder = DecoderStack(block_cfg)
    self.prefix = nn.DenseGeneral((cfg.block.num_prefix, token_cfg.d_model), use_bias=False,
                                  kernel_init=init(("embed", None, "mlp")), dtype=dtype,
                                  param_dtype=param_dtype)
    self.token_embed = Embedder(token_cfg)
    self.token_decoder = DecoderStack(token_cfg)

  # ---------------------------------------------------------------------------------------------
  # The pieces.

  def embed_blocks(self, blocks_BxMxC: jax.Array) -> jax.Array:
    """Concatenates the lookup embeddings of each block's tokens: [B, M, C] -> [B, M, E]."""
    b, n, _ = blocks_BxMxC.shape
    return self.lookup(blocks_BxMxC).reshape(b, n, -1)

  def contexts(self, blocks_BxMxC: jax.Array, cache=None):
    """Block decoder over the start embedding then the M blocks, from block position 0.

    Returns the M + 1 contexts `[B, M + 1, E]` (context i has seen blocks < i) and the cache.
    """
    b = blocks_BxMxC.shape[0]
    start_Bx1xE = jnp.broadcast_to(self.start.astype(jnp.dtype(self.cfg.dtype)),
                                   (b, 1, self.start.shape[0]))
    x_BxMxE = jnp.concatenate([start_Bx1xE, self.embed_blocks(blocks_BxMxC)], axis=1)
    return self.block_decoder(x_BxMxE, _arange(b, x_BxMxE.shape[1]), cache)

  def decode_blocks(self, ctx_BxMxE: jax.Array, blocks_BxMxC: jax.Array) -> jax.Array:
    """Teacher-forced token decoder: states `[B, M, C, E]`, entry j predicting token j of a
    block (`token_embed.decode` makes them logits)."""
    b, n, length = blocks_BxMxC.shape
    r = self.cfg.block.num_prefix
    prefix_BxMxRxE = self.prefix(ctx_BxMxE)
    x_BxMxCxE = self.token_embed.encode(blocks_BxMxC[..., :-1])
    seq_BMxTxE = jnp.concatenate([prefix_BxMxRxE, x_BxMxCxE], axis=2).reshape(
        b * n, r + length - 1, -1)
    h_BMxTxE, _ = self.token_decoder(seq_BMxTxE, _arange(b * n, r + length - 1))
    return h_BMxTxE[:, r - 1:].reshape(b, n, length, -1)

  def start_block(self, ctx_BxE: jax.Array, local_cache):
    """Token decoder prefill of a new block: only the R prefix vectors.

    Returns the logits of the block's first token and the local cache. Slots R.. keep what the
    previous block left there: the causal mask hides it and the block's tokens overwrite it.
    """
    prefix_BxRxE = self.prefix(ctx_BxE)
    b, r, _ = prefix_BxRxE.shape
    h_BxRxE, local_cache = self.token_decoder(prefix_BxRxE, _arange(b, r), local_cache)
    return self.token_embed.decode(h_BxRxE[:, -1]), local_cache

  # ---------------------------------------------------------------------------------------------
  # Training, prefill and decode.

  def forward(self, tokens_BxT: jax.Array, block_cache=None, logits_at: jax.Array | None = None):
    """Teacher-forced pass, blocks aligned to token 0.

    Returns logits `[B, T, V]` (entry t predicts token t + 1), or `[B, T', V]` at the entries
    `logits_at` (`[B, T']`) names, the contexts of blocks 0..T//L and the block decoder cache
    (when given).
    """
    b, t = tokens_BxT.shape
    length, pad = self.cfg.block.block_len, self.cfg.block.pad_id
    n = t // length  # complete blocks: the block decoder sees only these
    ctx_BxMxE, block_cache = self.contexts(tokens_BxT[:, :n * length].reshape(b, n, length),
                                           block_cache)
    # The token decoder runs on every block that holds a target; it is causal, so the pad
    # filling the last block changes nothing before it.
    padded_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, (n + 1) * length - t)), constant_values=pad)
    blocks_BxMxC = padded_BxT.reshape(b, n + 1, length)
    if logits_at is None:
      h_BxTxE = self.decode_blocks(ctx_BxMxE, blocks_BxMxC).reshape(b, (n + 1) * length, -1)
      return self.token_embed.decode(h_BxTxE[:, 1:t + 1]), ctx_BxMxE, block_cache
    # Entry t is state (t + 1) % C of block (t + 1) // C: the token decoder runs on those only.
    # Below, `[B, T']` and `[B, T', ...]` are over the T' entries `logits_at` names.
    block_at, slot_at = jnp.divmod(logits_at + 1, length)
    h_at = self.decode_blocks(jnp.take_along_axis(ctx_BxMxE, block_at[..., None], axis=1),
                              jnp.take_along_axis(blocks_BxMxC, block_at[..., None], axis=1))
    h_at = jnp.take_along_axis(h_at, slot_at[..., None, None], axis=2)[:, :, 0]
    return self.token_embed.decode(h_at), ctx_BxMxE, block_cache

  def prefill(self, tokens_BxT: jax.Array, lengths_B: jax.Array, cache: BlockCache,
              logits_at: jax.Array | None = None):
    """Right-padded prompts of `lengths_B` tokens, each left-padded to end at a block boundary.

    Returns logits `[B, T, V]` at the prompts' own positions (or `[B, T', V]` at the positions
    `logits_at` names) and the cache, ready to decode position `lengths_B` (the cache's `shift`
    maps positions onto the padded sequence).
    """
    b, t = tokens_BxT.shape
    length, pad = self.cfg.block.block_len, self.cfg.block.pad_id
    shift_B = (-lengths_B.astype(jnp.int32)) % length
    src_BxT = _arange(b, t + length - 1) - shift_B[:, None]
    padded_BxT = jnp.where(
        src_BxT >= 0, jnp.take_along_axis(tokens_BxT, jnp.clip(src_BxT, 0, t - 1), axis=1), pad)
    next_block_B = (lengths_B + shift_B) // length
    # The block decoder's prompt: the start embedding and the prompt's complete blocks.
    blocks = cache.blocks.with_prompt_lengths(next_block_B + 1)
    logits, ctx_BxMxE, blocks = self.forward(
        padded_BxT, blocks, None if logits_at is None else logits_at + shift_B[:, None])
    if logits_at is None:  # every position of the padded sequence: keep the prompts' own
      logits = jnp.take_along_axis(logits, _arange(b, t, shift_B[:, None])[..., None], axis=1)
    ctx_BxE = jnp.take_along_axis(ctx_BxMxE, next_block_B[:, None, None], axis=1)[:, 0]
    _, local = self.start_block(ctx_BxE, cache.local)
    return logits, cache.replace(blocks=blocks, local=local, shift=shift_B,
                                 block_tokens=jnp.full_like(cache.block_tokens, pad))

  def step(self, tokens_Bx1: jax.Array, positions_Bx1: jax.Array, cache: BlockCache):
    """One token per sequence. A token that completes its block runs the block decoder once and
    restarts the token decoder from the new context; any other token is one token decoder step.

    Every sequence sits at the same offset within its block: prefill makes every prompt end at
    a block boundary and each step advances every sequence by one token.
    """
    length, r = self.cfg.block.block_len, self.cfg.block.num_prefix
    x_B = tokens_Bx1[:, 0]
    q_B = positions_Bx1[:, 0] + cache.shift
    j_B = q_B % length
    cache = cache.replace(
        block_tokens=cache.block_tokens.at[jnp.arange(x_B.shape[0]), j_B].set(x_B))

    def within_block(mdl, cache):
      h_Bx1xE, local = mdl.token_decoder(mdl.token_embed.encode(x_B[:, None]), (r + j_B)[:, None],
                                         cache.local)
      return mdl.token_embed.decode(h_Bx1xE[:, 0]), cache.replace(local=local)

    def next_block(mdl, cache):
      ctx_Bx1xE, blocks = mdl.block_decoder(mdl.embed_blocks(cache.block_tokens[:, None]),
                                            (q_B // length + 1)[:, None], cache.blocks)
      logits_BxV, local = mdl.start_block(ctx_Bx1xE[:, 0], cache.local)
      return logits_BxV, cache.replace(blocks=blocks, local=local)

    logits_BxV, cache = nn.cond(jnp.all(j_B == length - 1), next_block, within_block, self, cache)
    return logits_BxV[:, None], cache

  def __call__(self, tokens_BxT: jax.Array, positions: jax.Array | None = None, cache=None,
               logits_at: jax.Array | None = None):
    """Without a cache the tokens start at position 0 and `positions` is not needed. With one,
    several tokens are a prompt from position 0 (of the lengths the cache was told, else all
    of them) and one token is a decode step (its logits are the only ones). `logits_at`
    (`[B, T']` token indices) computes the logits there only."""
    if cache is None:
      return self.forward(tokens_BxT, logits_at=logits_at)[0]
    if tokens_BxT.shape[1] == 1:
      return self.step(tokens_BxT, positions, cache)
    return self.prefill(tokens_BxT, jnp.minimum(cache.lengths, tokens_BxT.shape[1]), cache,
                        logits_at)


# -------------------------------------------------------------------------------------------------
# Training objective.


def pad_documents(tokens_BxT: jax.Array, rng: jax.Array, *, block_len: int, pad_id: int,
                  eos_id: int) -> tuple[jax.Array, jax.Array]:
  """Puts 0..block_len-1 pad tokens (uniformly drawn) before every document, i.e. before the
  first token and after every EOS, so documents start at every offset within a block.

  Tokens pushed past the end are dropped. Returns the tokens and a mask of the original ones.
  """
  b, t = tokens_BxT.shape
  starts_BxT = jnp.concatenate([jnp.ones((b, 1), bool), tokens_BxT[:, :-1] == eos_id], axis=1)
  pads_BxT = jnp.where(starts_BxT, jax.random.randint(rng, (b, t), 0, block_len), 0)
  dest_BxT = jnp.arange(t) + jnp.cumsum(pads_BxT, axis=1)
  rows_Bx1 = jnp.arange(b)[:, None]
  padded_BxT = jnp.full_like(tokens_BxT, pad_id).at[rows_Bx1, dest_BxT].set(tokens_BxT,
                                                                           mode="drop")
  real_BxT = jnp.zeros((b, t), bool).at[rows_Bx1, dest_BxT].set(True, mode="drop")
  return padded_BxT, real_BxT


def loss(model: BlockTransformer, params, tokens_BxT1: jax.Array, rng: jax.Array):
  """Mean next-token cross-entropy over the text after `pad_documents` (pad targets are not
  scored), and as a metric the same loss for each position within a block."""
  block = model.cfg.block
  tokens_BxT1, real_BxT1 = pad_documents(tokens_BxT1, rng, block_len=block.block_len,
                                         pad_id=block.pad_id, eos_id=block.eos_id)
  logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1])
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:])
  weight_BxT = real_BxT1[:, 1:].astype(jnp.float32)
  t = ce_BxT.shape[1]
  # Token t + 1 is the target of entry t; blocks are aligned to token 0.
  position_TxL = jax.nn.one_hot(jnp.arange(1, t + 1) % block.block_len, block.block_len)
  total_L = jnp.einsum("bt,bt,tl->l", ce_BxT, weight_BxT, position_TxL)
  count_L = jnp.einsum("bt,tl->l", weight_BxT, position_TxL)
  mean = jnp.sum(ce_BxT * weight_BxT) / jnp.maximum(jnp.sum(weight_BxT), 1.0)
  return mean, {"loss_by_block_position": total_L / jnp.maximum(count_L, 1.0)}
