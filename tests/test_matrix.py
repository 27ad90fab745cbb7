"""The composition matrix: K/V sharing x token selection x model, through one seam.

For every cell that the registry accepts: prefill of right-padded prompts plus greedy decode
steps gives the logits of a full forward under the mask the method stands for (built here from
the method's definition, and from the kept sets its cache reports); the generate loop from the
prefilled state gives the tokens of the step-by-step argmax; and the cache holds exactly the bytes
its layout implies. Every other cell is rejected at config load with one error naming the keys.

Compilations are shared within a (model, sharing) group, which runs on one test worker: the
method decides the prefill, but a cache decodes the same way whatever config made it (every
eviction policy leaves the same compacted shapes), and a reference under explicit masks needs
the method's parameters only (the gate's).
"""

import functools
import itertools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import kvjax
from kvjax.decode import (SamplingConfig, decode_loop, decode_step, init_cache, prefill_cache,
                          start_decoding)
from kvjax.errors import ConfigError
from kvjax.layers.cache import KVCache, Layout
from kvjax.layers.dot_product import dot_product_attention
from kvjax.moa.masks import prefill_mask
from kvjax.moa.plan import Plan

B, P, G = 2, 24, 8  # batch, padded prompt width, new tokens
N = P + G  # positions every cache is made for
LENGTHS = np.array([24, 17])
WIDTH = P + G - 1  # the reference sequences: each prompt, then the tokens fed back
L, R = 4, 2  # Block Transformer: tokens per block, prefix vectors
MOA_BLOCK, MOA_SINK = 8, 4
RATIO = 0.5  # eviction keep ratio

BASE = ("model.d_model=32", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=64", "model.init_std=0.2", "data.seq_len=32")
SHARING = {"none": (), "cla2": ("model.kv_sharing.factor=2",),
           "irregular": ("model.kv_sharing.producer_of=[0,1,1,1]",)}
MODELS = {"llama": (), "scanned": ("model.scan_layers=true",),
          "block": ("model.kind=block_transformer", f"model.block.block_len={L}",
                    f"model.block.num_prefix={R}", "model.block.token_decoder.num_layers=1",
                    "model.block.token_decoder.kv_sharing.factor=1")}
POLICIES = ("h2o", "tova", "snapkv", "streaming_llm", "random", "local_window")
SELECTIONS = ("dense", "moa", "gate", *POLICIES)
# Per (layer, query head): spans 16..32 slots at N = 32, mixed within each K/V group.
PLAN = Plan(alphas=((16.0, 0.0, 24.0, 8.0), (40.0, 16.0, 0.0, 12.0), (0.0, 8.0, 16.0, 24.0),
                    (8.0, 8.0, 0.0, 30.0)),
            betas=((0.0, 0.3, 0.0, 0.5), (0.0, 0.0, 0.5, 0.0), (0.75, 0.0, 0.0, 0.0),
                   (0.0, 0.25, 0.5, 0.0)))


def overrides(model: str, sharing: str, selection: str, plan_path) -> list[str]:
  out = [*BASE, *MODELS[model], *SHARING[sharing]]
  if selection == "moa":
    out += [f"model.moa.plan={plan_path}", f"model.moa.block_size={MOA_BLOCK}",
            f"model.moa.sink_tokens={MOA_SINK}"]
  elif selection == "gate":
    out += ["model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
            "model.attention_gate.head_dim=8", "model.attention_gate.num_sinks=2"]
  elif selection != "dense":
    out += [f"model.eviction.policy={selection}", f"model.eviction.keep_ratio={RATIO}"]
  return out


def accepted(model: str, sharing: str, selection: str) -> bool:
  if model == "scanned":
    return selection == "dense" and sharing != "irregular"
  if model == "block":
    return selection not in ("moa", "gate")
  return True


CELLS = list(itertools.product(MODELS, SHARING, SELECTIONS))
GOOD = [c for c in CELLS if accepted(*c)]
BAD = [c for c in CELLS if not accepted(*c)]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("plan") / "plan.json"
  PLAN.save(path)
  return path


# ---------------------------------------------------------------------------------------------
# The references.


@flax.struct.dataclass
class MaskedReference(Layout):
  """A whole sequence attended under explicit masks, one per layer that reads the layout."""

  masks: tuple  # per reader: [B, H or K, T, T]
  readers: tuple = flax.struct.field(pytree_node=False)
  reader: int = flax.struct.field(pytree_node=False)

  def write(self, chunk):
    return self

  def attend(self, q_BxTxHxD, chunk):
    mask = self.masks[self.readers.index(self.reader)]
    return dot_product_attention(q_BxTxHxD, chunk.k, chunk.v, mask), self

  def for_layer(self, layer):
    return self.replace(reader=layer)


def reference_cache(cfg, masks_of_layer) -> KVCache:
  """Per producer, the masks of the layers that read it (`masks_of_layer(layer, producer)`)."""
  layouts = []
  for p in sorted(set(cfg.producer_of)):
    readers = tuple(i for i, q in enumerate(cfg.producer_of) if q == p)
    layouts.append(MaskedReference(masks=tuple(jnp.asarray(masks_of_layer(i, p)) for i in readers),
                                   readers=readers, reader=p))
  return KVCache(layers=tuple(layouts), max_len=0)


def causal_TxT(t: int) -> np.ndarray:
  return np.tril(np.ones((t, t), bool))


def kept_sets(layer, lengths) -> np.ndarray:
  """`[B, K, S]`: the prompt positions a compacted layout holds per sequence and K/V head."""
  pos, sizes = np.asarray(layer.pos), layer.heads.sizes
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  kept = np.zeros((pos.shape[0], len(sizes), WIDTH), bool)
  for b in range(pos.shape[0]):
    for h in range(len(sizes)):
      rows = pos[b, offsets[h]:offsets[h + 1]]
      kept[b, h, rows[(rows >= 0) & (rows < lengths[b])]] = True
  return kept


def decode_masks(kept_BxKxS, starts_B, width: int, prefill=None) -> np.ndarray:
  """`[B, K, T, T]`: queries before each sequence's start see `prefill` (default: causal), later
  ones the kept prompt tokens and everything from the start on, causally."""
  t = np.arange(width)
  causal = causal_TxT(width)
  out = np.zeros((*kept_BxKxS.shape[:2], width, width), bool)
  for b, start in enumerate(starts_B):
    later = (t >= start)[None, :] | kept_BxKxS[b, :, :width]  # K x S
    out[b] = causal & later[:, None, :]
    out[b, :, :start] = causal[:start] if prefill is None else prefill[b, :, :start]
  return out


def moa_sizes(n: int) -> np.ndarray:
  """`[L, H]` slots per query head from the plan's rules (the paper's formula, rounded up to
  blocks, at least two)."""
  span = np.floor(np.asarray(PLAN.alphas) + np.asarray(PLAN.betas) * n)
  return -(-np.maximum(np.minimum(span, n), 2 * MOA_BLOCK) // MOA_BLOCK) * MOA_BLOCK


def moa_masks(layer: int) -> np.ndarray:
  """`[B, H, T, T]`: a prompt query sees its block band and the sink block; a decode step the
  sinks and its head's window."""
  windows = moa_sizes(N)[layer] - MOA_SINK
  band = prefill_mask(WIDTH, tuple(-(-w // MOA_BLOCK) for w in windows), MOA_BLOCK, MOA_SINK)
  t, s = np.arange(WIDTH)[:, None], np.arange(WIDTH)[None, :]
  window = (s <= t) & ((s < MOA_SINK) | (t - s < windows[:, None, None]))
  out = np.zeros((B, len(windows), WIDTH, WIDTH), bool)
  for b, n in enumerate(LENGTHS):
    out[b] = np.where((t < n)[None], band, window)
  return out


# ---------------------------------------------------------------------------------------------
# One cell.


@functools.cache
def params_for(model_kind, sharing, gated: bool):
  """Parameters shared by a group's cells: only the gate adds any."""
  cfg = kvjax.load_config(None, overrides(model_kind, sharing, "gate" if gated else "dense", ""))
  params = jax.jit(kvjax.build_model(cfg.model).init)(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  if gated:  # per-head score biases around the threshold: some tokens go
    flat = traverse_util.flatten_dict(params)
    for path in flat:
      if path[-2:] == ("filter", "bias"):
        flat[path] = jnp.asarray([-0.1, 0.4]) / 30.0  # stored divided by the gate's BIAS_STEP
    params = traverse_util.unflatten_dict(flat)
  return params


def build(model_kind, sharing, selection, plan_path):
  cfg = kvjax.load_config(None, overrides(model_kind, sharing, selection, plan_path))
  return cfg.model, kvjax.build_model(cfg.model), params_for(model_kind, sharing,
                                                             selection == "gate")


def decoder(model_kind, sharing, selection, plan_path):
  """The model that decodes the cell's cache and computes its reference: the dense one, shared
  by the cells of a group, except for the gate (its filter runs at every step)."""
  return _decoder(model_kind, sharing, "gate" if selection == "gate" else "dense", plan_path)


@functools.cache
def _decoder(model_kind, sharing, selection, plan_path):
  return build(model_kind, sharing, selection, plan_path)[1]


@functools.cache
def step_fn(model):
  return jax.jit(lambda p, tok, pos, cache: decode_step(model, p, tok, pos, cache))


@functools.cache
def reference_fn(model):
  return jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **kw),
                 static_argnames="method")


def decode_by_steps(model, decoding, params, cfg, prompts):
  """Prefill with the cell's model, then greedy steps one at a time with `decoding`: prompt
  logits, step logits, tokens, the cache decode starts from, and the generate loop's tokens from
  the same start."""
  cache, last_BxV, prompt_logits = prefill_cache(model, params, prompts, LENGTHS,
                                                 init_cache(cfg, B, N), keep_logits=True)
  cache = cache.finish_prefill(G - 1, jax.random.fold_in(jax.random.key(0), 1))
  start_cache = cache
  tokens, logits = [jnp.argmax(last_BxV, -1)], [last_BxV]
  for i in range(G - 1):
    step_logits, cache = step_fn(decoding)(params, tokens[-1], jnp.asarray(LENGTHS) + i, cache)
    logits.append(step_logits)
    tokens.append(jnp.argmax(step_logits, -1))
  state = start_decoding(last_BxV, LENGTHS, jax.tree.map(jnp.copy, start_cache), jax.random.key(0),
                         sampling=SamplingConfig(), max_new_tokens=G)
  looped = decode_loop(decoding, params, state, sampling=SamplingConfig()).tokens
  return (np.asarray(prompt_logits), np.stack(logits, 1), np.stack(tokens, 1), start_cache,
          np.asarray(looped))


def analytic_bytes(cfg, model_kind, selection, cache) -> int:
  """What the cache decode starts from must hold, from the layout's definition."""
  d, k, f32 = cfg.head_dim_, cfg.num_kv_heads, 4
  entry = 2 * d * f32 + 4  # a compacted row of one sequence: K, V and its int32 position
  if model_kind == "block":
    blocks = cfg.decoder("block_decoder")
    shift = -LENGTHS % L
    prompt_blocks = (LENGTHS + shift) // L + 1  # the start embedding and the complete blocks
    if selection == "dense":
      block_bytes = 2 * blocks.num_kv_layers * B * cfg.block.num_block_positions(N) * k * d * f32
    else:
      kept = np.maximum(np.round(RATIO * prompt_blocks), 1).max()
      block_bytes = blocks.num_kv_layers * B * k * int(kept + -(-(G - 1) // L) + 1) * entry
    local = 2 * cfg.decoder("token_decoder").num_kv_layers * B * (R + L - 1) * k * d * f32
    return block_bytes + local + B * (L + 2) * 4  # block tokens, shifts, prompt lengths
  if selection == "dense":
    return 2 * cfg.num_kv_layers * B * N * k * d * f32
  if selection == "moa":
    g = cfg.num_heads // k
    total = 0
    for p in sorted(set(cfg.producer_of)):
      readers = [i for i, q in enumerate(cfg.producer_of) if q == p]
      per_kv = moa_sizes(N)[readers].reshape(len(readers), k, g).max(axis=(0, 2))
      total += 2 * B * d * f32 * int(per_kv.sum()) + B * 4  # and the prompt lengths
    return total
  if selection == "gate":
    rows = sum(int(layer.kept_counts().max(axis=0)[h]) + G - 1
               for layer in cache.layers for h in range(k))
    return B * rows * entry
  kept = int(np.maximum(np.round(RATIO * LENGTHS), 1).max())
  return cfg.num_kv_layers * B * k * (kept + G - 1) * entry


def full_logits(model, params, cfg, model_kind, selection, tokens_BxG, cache):
  """The reference: one forward over each prompt and the tokens fed back, under the mask the
  method stands for; `[B, WIDTH', V]` and the offset of each sequence's first token."""
  seqs = np.zeros((B, WIDTH + L), np.int32)
  offsets = np.zeros(B, int)
  for b, n in enumerate(LENGTHS):
    row = list(PROMPTS[b, :n]) + list(tokens_BxG[b, :G - 1])
    if model_kind == "block":  # the paper's layout: pads before the prompt up to a block boundary
      offsets[b] = -n % L
      row = [cfg.block.pad_id] * offsets[b] + row
    seqs[b, :len(row)] = row
  apply = functools.partial(reference_fn(model), params)
  if model_kind == "block":
    if selection == "dense":
      return np.asarray(apply(jnp.asarray(seqs))), offsets
    # Eviction compacts the block decoder's cache: mask it over block positions.
    width = seqs.shape[1] // L + 1
    prompt_blocks = (LENGTHS + offsets) // L + 1
    masks = {p: decode_masks(kept_sets(layer, prompt_blocks), prompt_blocks, width)
             for p, layer in zip(sorted(set(cfg.decoder("block_decoder").producer_of)),
                                 cache.blocks.layers)}
    ref = reference_cache(cfg.decoder("block_decoder"), lambda i, p: masks[p])
    logits = apply(jnp.asarray(seqs), ref, method="forward")[0]
    return np.asarray(logits), offsets
  seqs = jnp.asarray(seqs[:, :WIDTH])
  if selection == "dense":
    return np.asarray(apply(seqs)), offsets
  positions = jnp.broadcast_to(jnp.arange(WIDTH), (B, WIDTH))
  if selection == "moa":
    ref = reference_cache(cfg, lambda i, p: moa_masks(i))
  else:
    producers = sorted(set(cfg.producer_of))
    kept = {p: kept_sets(layer, LENGTHS) for p, layer in zip(producers, cache.layers)}
    # The gate evicts within the prompt too: there a query sees kept tokens and itself.
    prefill = None if selection != "gate" else {
        p: causal_TxT(WIDTH) & (kept[p][:, :, None, :] | np.eye(WIDTH, dtype=bool)) for p in kept}
    ref = reference_cache(cfg, lambda i, p: decode_masks(
        kept[p], LENGTHS, WIDTH, None if prefill is None else prefill[p]))
  return np.asarray(apply(seqs, positions=positions, cache=ref)[0]), offsets


PROMPTS = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 0, 256, jnp.int32))


@pytest.mark.parametrize("model_kind, sharing, selection", [
    pytest.param(*c, id="-".join(c), marks=pytest.mark.xdist_group(f"{c[0]}-{c[1]}"))
    for c in GOOD])
def test_cell_decodes_its_masked_full_forward(model_kind, sharing, selection, plan_path):
  cfg, model, params = build(model_kind, sharing, selection, plan_path)
  decoding = decoder(model_kind, sharing, selection, plan_path)
  prompt_logits, step_logits, tokens, cache, looped = decode_by_steps(model, decoding, params,
                                                                      cfg, PROMPTS)
  np.testing.assert_array_equal(looped, tokens)

  full, offsets = full_logits(decoding, params, cfg, model_kind, selection, tokens, cache)
  for b, n in enumerate(LENGTHS):
    s = offsets[b]
    np.testing.assert_allclose(prompt_logits[b, :n], full[b, s:s + n], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(step_logits[b], full[b, s + n - 1:s + n - 1 + G], atol=2e-4,
                               rtol=2e-4)
  assert cache.nbytes == analytic_bytes(cfg, model_kind, selection, cache)


def expected_error(model_kind, sharing, selection) -> str:
  if model_kind == "scanned" and sharing == "irregular":
    return "model.scan_layers: needs every layer group"
  key = {"moa": "model.moa.plan", "gate": "model.attention_gate.enable"}.get(
      selection, "model.eviction.policy")
  if model_kind == "scanned":
    return f"model.scan_layers: cannot be combined with {key}: "
  return f"{key}: needs model.kind 'llama', got 'block_transformer': "


@pytest.mark.parametrize("model_kind, sharing, selection", BAD, ids=["-".join(c) for c in BAD])
def test_cell_is_rejected_at_config_load_with_its_reason(model_kind, sharing, selection,
                                                          plan_path):
  with pytest.raises(ConfigError) as e:
    kvjax.load_config(None, overrides(model_kind, sharing, selection, plan_path))
  assert str(e.value).startswith(expected_error(model_kind, sharing, selection))
  assert "\n" not in str(e.value)
