"""Block Transformer: decode == teacher-forced forward, causality between blocks, the two-level
cache's size, the training objective and config errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.decode import generate, init_cache
from kvjax.errors import ConfigError
from kvjax.models.block_transformer import loss, pad_documents
from tests.helpers import random_tokens

L, R, PAD, EOS = 4, 2, 256, 258
WIDTH = 17  # every teacher-forced reference runs at this width (one compile)
# Two decoders of different shapes: GQA and cross-layer K/V sharing (layers 0-1 share) in the
# block decoder, MQA with both layers sharing one K/V in the token decoder.
TINY = ("model.kind=block_transformer", "model.d_model=32", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=64", "model.max_seq_len=64", "model.init_std=0.2",
        "data.seq_len=32", "model.block.block_decoder.num_layers=3",
        "model.block.block_decoder.d_model=64", "model.block.block_decoder.kv_sharing.factor=2",
        "model.block.token_decoder.num_layers=2", "model.block.token_decoder.num_kv_heads=1",
        "model.block.token_decoder.kv_sharing.factor=2")


@pytest.fixture(scope="module")
def built():
  cfg = kvjax.load_config(None, TINY)
  model = kvjax.build_model(cfg.model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return cfg, model, params


@pytest.fixture(scope="module")
def forward(built):
  """Teacher-forced logits of rows right-padded to WIDTH (the model is causal)."""
  _, model, params = built
  apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))

  def run(rows):
    batch = np.full((len(rows), WIDTH), PAD, np.int32)
    for b, row in enumerate(rows):
      batch[b, :len(row)] = row
    return np.asarray(apply(jnp.asarray(batch)))

  return run


def left_padded(prompt) -> list[int]:
  """The paper's evaluation layout: pad tokens before the prompt up to a block boundary."""
  prompt = [int(x) for x in prompt]
  return [PAD] * (-len(prompt) % L) + prompt


def greedy_reference(forward, prompts, lengths, n):
  """Greedy continuation by re-running the teacher-forced forward on every left-padded prompt."""
  seqs = [left_padded(prompts[b, :lengths[b]]) for b in range(len(lengths))]
  for _ in range(n):
    logits = forward(seqs)
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits[b, len(s) - 1])))
  return [s[-n:] for s in seqs]


def test_greedy_generate_matches_teacher_forced_argmax_for_every_length_mod_block(built, forward):
  cfg, model, params = built
  lengths = np.arange(1, 2 * L + 1)  # every remainder modulo L, twice, right-padded
  prompts = np.asarray(random_tokens(len(lengths), int(lengths.max()), seed=1))
  n = 2 * L + 1
  cache = init_cache(cfg.model, len(lengths), int(lengths.max()) + n)
  assert (len(cache.blocks.layers), len(cache.local.layers)) == (2, 1)  # K/V producers
  out = generate(model, params, prompts, lengths, max_new_tokens=n, rng=jax.random.key(0),
                 cache=cache)
  expected = greedy_reference(forward, prompts, lengths, n)
  assert np.asarray(out.tokens).tolist() == expected
  assert len({t for row in expected for t in row}) > n  # not a degenerate continuation


def test_prefill_and_steps_match_teacher_forced_logits(built, forward):
  cfg, model, params = built
  lengths = np.array([5, 8, 3])
  prompts = random_tokens(3, 8, seed=3)
  fed = np.asarray(random_tokens(3, 2 * L, seed=4))
  variables = {"params": params}
  logits, cache = jax.jit(functools.partial(model.apply, method="prefill"))(
      variables, prompts, jnp.asarray(lengths), init_cache(cfg.model, 3, 8 + 2 * L))
  step = jax.jit(lambda tok, pos, c: model.apply(variables, tok, positions=pos, cache=c))
  steps = []
  for k in range(2 * L):
    step_logits, cache = step(jnp.asarray(fed[:, k:k + 1]), jnp.asarray(lengths[:, None] + k), cache)
    steps.append(np.asarray(step_logits[:, 0]))
  seqs = [left_padded(np.asarray(prompts[b, :n])) + fed[b].tolist() for b, n in enumerate(lengths)]
  full = forward(seqs)
  for b, n in enumerate(lengths):
    s = -n % L
    np.testing.assert_allclose(np.asarray(logits[b, :n]), full[b, s:s + n], atol=1e-4)
    np.testing.assert_allclose(np.stack([x[b] for x in steps]), full[b, s + n:s + n + 2 * L],
                               atol=1e-4)


def test_logits_at_selected_positions_equal_the_full_forward(built, forward):
  """The token decoder and LM head only where logits are asked for: teacher-forced, and in a
  prefill of ragged prompts (positions in the prompts' own coordinates)."""
  cfg, model, params = built
  variables = {"params": params}
  tokens = np.asarray(random_tokens(2, WIDTH, seed=6))
  at_BxN = np.array([[0, 3, 4, 16], [7, 7, 2, 11]], np.int32)
  want = np.take_along_axis(forward(list(tokens)), at_BxN[..., None], axis=1)
  got = model.apply(variables, jnp.asarray(tokens), logits_at=jnp.asarray(at_BxN))
  np.testing.assert_allclose(got, want, atol=1e-5)
  lengths = np.array([6, 9])
  at_BxN = np.array([[5, 0, 3], [8, 4, 1]], np.int32)
  got, _ = model.apply(variables, jnp.asarray(tokens[:, :9]), jnp.asarray(lengths),
                       init_cache(cfg.model, 2, 12), jnp.asarray(at_BxN), method="prefill")
  full = forward([left_padded(tokens[b, :n]) for b, n in enumerate(lengths)])
  shift_Bx1 = (-lengths % L)[:, None]
  np.testing.assert_allclose(got, np.take_along_axis(full, (at_BxN + shift_Bx1)[..., None], axis=1),
                             atol=1e-5)


def test_block_context_never_depends_on_later_blocks(built):
  _, model, params = built
  x = jax.random.normal(jax.random.key(5), (1, 6, 64))
  positions = jnp.arange(6)[None]
  contexts = lambda x: model.apply({"params": params}, x, positions,
                                   method=lambda m, x, p: m.block_decoder(x, p)[0])[0]
  jacobian = jax.jit(jax.jacrev(contexts))(x)  # [6, 64] outputs x [1, 6, 64] inputs
  norms = np.linalg.norm(np.asarray(jacobian[:, :, 0]), axis=(1, 3))  # [output i, input j]
  # Position 0 holds the start embedding and position i + 1 block i: context i sees j <= i only.
  assert np.all(np.triu(norms, k=1) == 0.0), norms
  assert np.all(norms[np.tril_indices(6)] > 0.0), norms


def test_logits_never_depend_on_later_tokens(built, forward):
  tokens = np.asarray(random_tokens(1, WIDTH, seed=6))[0]
  base = forward([tokens])
  for t in (2, 3, 4, 7):  # inside a block, last of a block, first of a block
    changed = tokens.copy()
    changed[t + 1:] = (changed[t + 1:] + 1) % 256
    out = forward([changed])
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_token_decoder_cache_never_holds_more_than_prefix_plus_block(built):
  """Cache shapes are static through prefill and the decode loop, so the initial ones hold."""
  cfg, _, _ = built
  for max_len in (8, 64):
    cache = init_cache(cfg.model, 2, max_len)
    assert cache.local.layers[0].k.shape[1] == R + L - 1
    assert cache.blocks.layers[0].k.shape[1] == (max_len + L - 2) // L + 2


def test_cache_reports_its_real_bytes_and_a_quarter_of_a_dense_one(built):
  cfg, _, _ = built
  cache = init_cache(cfg.model, 3, 64)
  # K and V in float32: the block decoder's 2 producers x 2 KV heads x 16 dims at 18 block
  # positions, the token decoder's 1 producer x 1 KV head x 8 dims at R + L - 1 = 5 slots; then
  # the current block's tokens, the shifts and the prompt lengths (int32).
  blocks, local = 2 * 2 * 3 * 18 * 2 * 16 * 4, 2 * 1 * 3 * 5 * 1 * 8 * 4
  assert cache.nbytes == blocks + local + 3 * (L + 2) * 4
  # The block decoder's cache, were it one entry per token.
  dense = init_cache(dataclasses.replace(cfg.model.decoder("block_decoder"), max_seq_len=64), 3, 64)
  assert cache.blocks.nbytes == dense.nbytes * 18 // 64  # 18 block positions for 64 tokens


def test_nnx_bridge_wraps_the_model(built):
  _, model, _ = built
  tokens = random_tokens(2, 5, seed=7)
  with nnx.use_eager_sharding(False):
    wrapped = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(wrapped, tokens)
    out = wrapped(tokens)
  params = nnx.to_pure_dict(nnx.state(wrapped, nnx.Param))
  np.testing.assert_allclose(out, model.apply({"params": params}, tokens), atol=1e-6)


def test_pad_documents_shifts_every_document_by_less_than_a_block():
  doc = [1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8, 9, EOS, 10, 11]
  tokens = jnp.asarray([doc] * 64, jnp.int32)
  padded, real = pad_documents(tokens, jax.random.key(9), block_len=L, pad_id=PAD, eos_id=EOS)
  padded, real = np.asarray(padded), np.asarray(real)
  offsets = set()
  for row, mask in zip(padded, real):
    kept = row[mask].tolist()
    assert kept == doc[:len(kept)] and (row[~mask] == PAD).all()
    runs = np.split(np.arange(len(row)), np.flatnonzero(np.diff(mask.astype(int))) + 1)
    for run in runs:
      if not mask[run[0]]:  # a run of pads: fewer than L, right before a document's first token
        assert len(run) < L and (run[0] == 0 or row[run[0] - 1] == EOS)
    offsets.add(int(np.argmax(mask)))
  assert offsets == set(range(L))


def test_loss_scores_only_real_targets_and_reports_every_block_position(built, forward):
  _, model, params = built
  tokens = np.asarray(random_tokens(4, WIDTH + 1, seed=8, vocab=EOS + 1))
  rng = jax.random.key(9)
  value, metrics = jax.jit(functools.partial(loss, model))(params, jnp.asarray(tokens), rng)
  padded, real = (np.asarray(a) for a in pad_documents(jnp.asarray(tokens), rng, block_len=L,
                                                         pad_id=PAD, eos_id=EOS))
  logits = forward(padded[:, :-1]).astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, padded[:, 1:, None], axis=-1)[..., 0]
  scored = real[:, 1:]
  assert not scored.all()  # some targets are pads
  np.testing.assert_allclose(float(value), nll[scored].mean(), rtol=1e-5)
  by_position = np.asarray(metrics["loss_by_block_position"])
  position = np.arange(1, WIDTH + 1) % L  # entry t's target is token t + 1
  np.testing.assert_allclose(by_position, [nll[scored & (position == j)].mean() for j in range(L)],
                             rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.block.block_len=0", "model.block.block_len: must be > 0"),
    ("model.block.block_len=3", "model.block.block_decoder.d_model: must be a multiple of "
                                "model.block.block_len=3"),
    ("model.block.token_decoder.num_kv_heads=3",
     "model.block.token_decoder: model.num_kv_heads: must divide model.num_heads=4, got 3"),
    ("model.block.pad_id=300", "model.block.pad_id: must be < model.vocab_size=264, got 300"),
    ("model.block.token_decoder.layers=2", "model.block.token_decoder.layers: unknown key"),
    ("model.block.block_decoder.kv_sharing.factor=4",
     "model.block.block_decoder: model.kv_sharing.factor: must be in 1..model.num_layers=3"),
])
def test_bad_block_configs_raise_one_clear_error(override, message):
  with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
    kvjax.load_config(None, [*TINY, override])
