"""Configuration: frozen dataclasses are the single source of every shape.

A config is YAML with the sections `model`, `data`, `train` and `mesh`, plus `key=value`
overrides (`model.num_layers=4`, `train.steps=30`). Every key is checked against the
dataclass fields, every value against the field's type, and every dataclass checks its own
invariants in `__post_init__`, so a bad config fails at load time with one `ConfigError`
that names the key and what is allowed.

This module is a leaf: it imports nothing else from kvjax (but its errors) and reads no file but
the YAML. What one section cannot know about another (which methods combine, a MoA plan's file,
the tokenizer's vocabulary) is checked by `kvjax.load_config` (`kvjax.checks`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kvjax.errors import ConfigError


def _require(cond: bool, key: str, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {allowed}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
  _require(value in choices, key, f"got {value!r}, allowed: {', '.join(choices)}")


DTYPES = ("float32", "bfloat16", "float16")
INT_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class KVSharingConfig:
  """Cross-layer K/V sharing (CLA, arXiv 2405.12981): `producer_of[l]` names the layer whose K/V
  layer l attends to (itself for a producer). Producers project K/V and own a cache buffer;
  consumers compute only queries. CLA-s is groups of s adjacent layers; any valid explicit
  pattern works too (e.g. the last k layers reusing the last non-shared layer)."""

  factor: int = 1  # CLA-s: groups of `factor` adjacent layers read their first layer's K/V
  producer_of: tuple[int, ...] = ()  # explicit pattern, one entry per layer (instead of factor)

  def resolve(self, num_layers: int) -> tuple[int, ...]:
    """The validated per-layer pattern; raises ConfigError naming the first broken rule."""
    key = "model.kv_sharing.producer_of"
    if not self.producer_of:
      _require(1 <= self.factor <= num_layers, "model.kv_sharing.factor",
               f"must be in 1..model.num_layers={num_layers}, got {self.factor}")
      return cla_pattern(self.factor, num_layers)
    _require(self.factor == 1, "model.kv_sharing", f"set either factor or producer_of, not both "
             f"(got factor={self.factor} and producer_of={list(self.producer_of)})")
    pattern = self.producer_of
    _require(len(pattern) == num_layers, key, f"needs one entry per layer (model.num_layers="
             f"{num_layers}), got {len(pattern)}")
    for layer, p in enumerate(pattern):
      _require(0 <= p <= layer, key,
               f"layer {layer} must read K/V of itself or an earlier layer (0..{layer}), got {p}")
      _require(not layer or p >= pattern[layer - 1], key, f"must be non-decreasing (groups are "
               f"runs of adjacent layers), got {p} after {pattern[layer - 1]} at layer {layer}")
      _require(pattern[p] == p, key, f"layer {layer} reads layer {p}, which is not a producer "
               f"(producer_of[{p}] = {pattern[p]}, must be {p})")
    return pattern


def cla_pattern(factor: int, num_layers: int) -> tuple[int, ...]:
  """Groups of `factor` adjacent layers share their first layer's K/V; the last may be shorter."""
  return tuple(layer - layer % factor for layer in range(num_layers))


def uniform_group_size(producer_of: tuple[int, ...]) -> int:
  """s if the pattern is CLA-s with every group full (what a layer scan repeats), else 0."""
  num_layers = len(producer_of)
  s = next((layer for layer, p in enumerate(producer_of) if layer and p == layer), num_layers)
  return s if num_layers % s == 0 and producer_of == cla_pattern(s, num_layers) else 0


@dataclasses.dataclass(frozen=True)
class MoAConfig:
  """MoA (arXiv 2406.14909, `kvjax.moa`): a JSON plan of per-head elastic sparse windows."""

  plan: str = ""  # path to the plan; "" for dense attention
  block_size: int = 64  # prefill block and cache size granularity
  sink_tokens: int = 64  # the first tokens, always visible (at most one block)

  def __post_init__(self):
    _require(self.block_size > 0, "model.moa.block_size", "must be > 0")
    _require(0 < self.sink_tokens <= self.block_size, "model.moa.sink_tokens",
             f"must be in [1, model.moa.block_size={self.block_size}], got {self.sink_tokens}")


GATE_PROTOCOLS = ("in_context", "compaction")


@dataclasses.dataclass(frozen=True)
class AttentionGateConfig:
  """Attention-Gate (arXiv 2410.12876): a small causal attention before each K/V-producing layer
  flags, per token and K/V head, whether later queries may see that token (`kvjax.gate`)."""

  enable: bool = False
  num_heads: int = 4
  head_dim: int = 32
  threshold: float = 0.5  # keep iff sigmoid score > threshold
  num_sinks: int = 4  # the first positions are always kept
  keep_ratio: float = 0.5  # the eviction loss drives each layer's kept fraction here
  loss_weight: float = 1.0
  gate_decode: bool = False  # also gate decoded tokens (the gate then keeps its own K/V cache)
  # The keys at most this many positions before a query stay visible to it whatever their flags
  # (so the cache holds them until they leave the window; they count as kept in the budget).
  recent_tokens: int = 0
  # in_context: the gate's flags decide what the cache keeps while the prompt goes in;
  # compaction: a dense prefill, then each (sequence, K/V head) keeps its round(keep_ratio x
  # prompt length) best-scored tokens (the gate as a scorer, as eviction policies compact).
  protocol: str = "in_context"

  def __post_init__(self):
    _choice(self.protocol, "model.attention_gate.protocol", GATE_PROTOCOLS)
    for name in ("num_heads", "head_dim"):
      _require(getattr(self, name) > 0, f"model.attention_gate.{name}", "must be > 0")
    _require(self.head_dim % 2 == 0, "model.attention_gate.head_dim", "must be even for RoPE")
    _require(0.0 < self.threshold < 1.0, "model.attention_gate.threshold", "must be in (0, 1)")
    _require(self.num_sinks >= 0, "model.attention_gate.num_sinks", "must be >= 0")
    _require(0.0 < self.keep_ratio <= 1.0, "model.attention_gate.keep_ratio", "must be in (0, 1]")
    _require(self.loss_weight >= 0, "model.attention_gate.loss_weight", "must be >= 0")
    _require(self.recent_tokens >= 0, "model.attention_gate.recent_tokens", "must be >= 0")
    _require(not (self.gate_decode and self.protocol == "compaction"),
             "model.attention_gate.gate_decode", "needs protocol in_context (compaction keeps "
             "every decoded token)")


EVICTION_POLICIES = ("none", "h2o", "tova", "snapkv", "streaming_llm", "random", "local_window")
EVICTION_PROTOCOLS = ("compaction", "in_context")


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
  """Score-based K/V eviction (`kvjax.eviction`): every (layer, K/V head) keeps
  round(keep_ratio * prompt length) prompt tokens chosen by `policy`."""

  policy: str = "none"
  keep_ratio: float = 0.5
  # compaction: a dense prefill, then the choice; in_context: a cache of the final size that
  # evicts while the prompt goes in (each prompt query sees what the policy held so far).
  protocol: str = "compaction"

  def __post_init__(self):
    _choice(self.policy, "model.eviction.policy", EVICTION_POLICIES)
    _require(0.0 < self.keep_ratio <= 1.0, "model.eviction.keep_ratio", "must be in (0, 1]")
    _choice(self.protocol, "model.eviction.protocol", EVICTION_PROTOCOLS)
    _require(not (self.policy == "snapkv" and self.protocol == "in_context"),
             "model.eviction.protocol", "in_context cannot run policy snapkv, which scores keys "
             "from the prompt's last window (use compaction)")


KV_QUANT_MODES = ("none", "int8", "fp8", "int4")
KV_QUANT_BITS = {"int8": 8, "fp8": 8, "int4": 4}
SCALE_BYTES = 2  # a bfloat16 scale per group of values


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
  """Quantized cache entries (`kvjax.quant`): every K/V head's D values of a token become codes
  (int8; float8 e4m3; int4, two per byte) and one bfloat16 scale per `group_size` of them
  (0: one per head), dequantized where the cache is read. `rotate` quantizes each head's values
  in the Walsh-Hadamard basis: K's outlier channels (after RoPE) are spread over the whole head
  instead of setting the scale of their group, and attention's dot products are unchanged."""

  mode: str = "none"
  group_size: int = 0
  rotate: bool = False

  def __post_init__(self):
    _choice(self.mode, "model.kv_quant.mode", KV_QUANT_MODES)
    _require(self.group_size >= 0, "model.kv_quant.group_size",
             f"must be >= 0 (0: one scale per K/V head), got {self.group_size}")
    _require(not self.rotate or self.mode != "none", "model.kv_quant.rotate",
             "rotates quantized entries: set model.kv_quant.mode to int8, fp8 or int4")

  def entry_bytes(self, head_dim: int) -> int:
    """Bytes of one (token, K/V head) entry of K or V: codes and scales."""
    return head_dim * KV_QUANT_BITS[self.mode] // 8 + SCALE_BYTES * head_dim // (
        self.group_size or head_dim)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """One Block Transformer decoder's shape; a field left unset takes the model's value."""

  num_layers: int | None = None
  d_model: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  kv_sharing: KVSharingConfig | None = None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Block Transformer (arXiv 2406.02657), used when `model.kind` is `block_transformer`.

  The block decoder attends over blocks of `block_len` tokens; the token decoder decodes each
  block from `num_prefix` vectors projected from the context of the blocks before it.
  """

  block_len: int = 4
  num_prefix: int = 2
  pad_id: int = 256  # put before documents and prompts to shift them within a block
  eos_id: int = 258  # ends every document in the training stream (documents start after it)
  block_decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
  token_decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

  def __post_init__(self):
    for name in ("block_len", "num_prefix"):
      _require(getattr(self, name) > 0, f"model.block.{name}", "must be > 0")
    for name in ("pad_id", "eos_id"):
      _require(getattr(self, name) >= 0, f"model.block.{name}", "must be >= 0")

  def num_block_positions(self, max_len: int) -> int:
    """Block decoder positions for `max_len` tokens after up to `block_len - 1` pads: the start
    embedding, then one per block."""
    return (max_len + self.block_len - 2) // self.block_len + 2


MODEL_KINDS = ("llama", "block_transformer")
ATTENTION_IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, and the sections of
  the methods that shrink its cache (which of them combine is `kvjax.registry`'s to say)."""

  kind: str = "llama"
  vocab_size: int = 264
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 0  # 0: d_model // num_heads
  mlp_dim: int = 1024
  max_seq_len: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"  # activations
  param_dtype: str = "float32"
  cache_dtype: str = "float32"  # K/V as stored, unless model.kv_quant stores codes and scales
  attention_impl: str = "auto"  # auto | xla | pallas
  # Run the layers as one `nn.scan` over groups of (producer + consumers): compile time and
  # program size stop growing with depth; parameters and the dense cache gain a leading axis.
  scan_layers: bool = False
  # Recompute each layer's activations in the backward pass instead of storing them
  # (`nn.remat` around every layer, or around the scanned group): memory for compute.
  remat: bool = False
  # Pretrained weights (see `kvjax.io`): "" for random init or a kvjax training checkpoint;
  # otherwise a .gguf file, an HF directory (config.json + *.safetensors), or a named source.
  weights: str = ""
  kv_sharing: KVSharingConfig = dataclasses.field(default_factory=KVSharingConfig)
  moa: MoAConfig = dataclasses.field(default_factory=MoAConfig)
  attention_gate: AttentionGateConfig = dataclasses.field(default_factory=AttentionGateConfig)
  eviction: EvictionConfig = dataclasses.field(default_factory=EvictionConfig)
  kv_quant: KVQuantConfig = dataclasses.field(default_factory=KVQuantConfig)
  block: BlockConfig = dataclasses.field(default_factory=BlockConfig)

  def __post_init__(self):
    _choice(self.kind, "model.kind", MODEL_KINDS)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "mlp_dim", "max_seq_len"):
      _require(getattr(self, name) > 0, f"model.{name}", "must be > 0")
    _require(self.head_dim >= 0, "model.head_dim", "must be >= 0 (0 means d_model // num_heads)")
    if self.head_dim == 0:
      _require(self.d_model % self.num_heads == 0, "model.num_heads",
               f"must divide model.d_model={self.d_model} (or set model.head_dim), "
               f"got {self.num_heads}")
    _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
             f"must divide model.num_heads={self.num_heads}, got {self.num_kv_heads}")
    _require(self.head_dim_ % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim_}")
    _require(self.rope_theta > 0, "model.rope_theta", "must be > 0")
    _require(self.norm_eps > 0, "model.norm_eps", "must be > 0")
    _require(self.init_std > 0, "model.init_std", "must be > 0")
    recent = self.attention_gate.recent_tokens
    _require(recent < self.max_seq_len, "model.attention_gate.recent_tokens",
             f"must be < model.max_seq_len={self.max_seq_len}, got {recent}")
    for name in ("dtype", "param_dtype", "cache_dtype"):
      _choice(getattr(self, name), f"model.{name}", DTYPES)
    _choice(self.attention_impl, "model.attention_impl", ATTENTION_IMPLS)
    self.producer_of  # noqa: B018 (resolves and validates the sharing pattern once)
    if self.kind == "block_transformer":
      self._check_block()

  def _check_block(self) -> None:
    block = self.block
    for name in ("pad_id", "eos_id"):
      _require(getattr(block, name) < self.vocab_size, f"model.block.{name}",
               f"must be < model.vocab_size={self.vocab_size}, got {getattr(block, name)}")
    width = self.decoder("block_decoder").d_model
    _require(width % block.block_len == 0, "model.block.block_decoder.d_model",
             f"must be a multiple of model.block.block_len={block.block_len} (each token's lookup "
             f"embedding is d_model / block_len wide), got {width}")
    self.decoder("token_decoder")

  def decoder(self, name: str) -> ModelConfig:
    """The Llama-style config of the Block Transformer's `block_decoder` or `token_decoder`."""
    sub = getattr(self.block, name)
    shape = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)
             if getattr(sub, f.name) is not None}
    positions = {"block_decoder": self.block.num_block_positions(self.max_seq_len),
                 "token_decoder": self.block.num_prefix + self.block.block_len - 1}[name]
    try:
      return dataclasses.replace(self, kind="llama", max_seq_len=positions, **shape)
    except ConfigError as e:
      raise ConfigError(f"model.block.{name}: {e}") from None

  @property
  def head_dim_(self) -> int:
    """The head dimension, resolved."""
    return self.head_dim or self.d_model // self.num_heads

  @functools.cached_property
  def producer_of(self) -> tuple[int, ...]:
    """For every layer, the layer whose K/V it attends to (itself for a producer)."""
    return self.kv_sharing.resolve(self.num_layers)

  @property
  def scan_group_size(self) -> int:
    """Layers in each scanned group (one producer and its consumers); 0 if they differ."""
    return uniform_group_size(self.producer_of)

  @property
  def num_kv_layers(self) -> int:
    """Layers that own a K/V cache buffer."""
    return len(set(self.producer_of))

  def kv_bytes_per_token(self) -> int:
    """Dense-cache bytes per position: K and V of every KV head of every producer."""
    if self.kv_quant.mode == "none":
      entry = self.head_dim_ * {"float32": 4, "bfloat16": 2, "float16": 2}[self.cache_dtype]
    else:
      entry = self.kv_quant.entry_bytes(self.head_dim_)
    return 2 * self.num_kv_heads * self.num_kv_layers * entry


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes token ids."""

  source: str = "shakespeare"  # shakespeare | web_bible | a path to a text file or directory
  tokenizer: str = "byte"  # a name of `kvjax.data.tokenizers` (checked with the model's vocab)
  seq_len: int = 256
  val_fraction: float = 0.05
  seed: int = 0
  worker_count: int = 0

  def __post_init__(self):
    _require(bool(self.source), "data.source", "'shakespeare', 'web_bible' or a path to text files")
    _require(self.seq_len > 0, "data.seq_len", "must be > 0")
    _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _require(self.worker_count >= 0, "data.worker_count", "must be >= 0")


# Kernels LoRA can adapt: attention projections, and the MLP's (`gate` is the SwiGLU gate).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation, checkpointing and logging cadence."""

  steps: int = 2000
  batch_size: int = 32
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  eval_every: int = 250
  eval_batches: int = 8
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 25
  sample_tokens: int = 200  # 0: no text samples at the end of training
  num_samples: int = 3
  sample_prompt: str = "ROMEO:"
  sample_temperature: float = 0.8
  base: str = ""  # a kvjax training workdir whose parameters start this run (see freeze_base)
  freeze_base: bool = False  # train only what the base (train.base or model.weights) lacks
  # LoRA on the frozen base (`kvjax.training.params`): kernel W + (A @ B) * lora_alpha / lora_rank.
  lora_rank: int = 0  # 0: no LoRA
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o")  # of LORA_TARGETS

  def __post_init__(self):
    for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every", "num_samples"):
      _require(getattr(self, name) > 0, f"train.{name}", "must be > 0")
    for name in ("warmup_steps", "sample_tokens"):
      _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
    _require(self.lr > 0, "train.lr", "must be > 0")
    _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "train.b1/b2", "must be in [0, 1)")
    _require(self.grad_clip > 0, "train.grad_clip", "must be > 0")
    _require(self.sample_temperature >= 0, "train.sample_temperature", "must be >= 0 (0: greedy)")
    _require(self.lora_rank >= 0, "train.lora_rank",
             f"must be >= 0 (0: no LoRA), got {self.lora_rank}")
    _require(self.lora_alpha > 0, "train.lora_alpha", "must be > 0")
    _require(bool(self.lora_targets), "train.lora_targets", f"must name at least one of "
             f"{', '.join(LORA_TARGETS)}")
    for target in self.lora_targets:
      _choice(target, "train.lora_targets", LORA_TARGETS)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape; -1 fills in the remaining devices (at most one axis)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    shape = (self.data, self.fsdp, self.tensor)
    _require(all(s == -1 or s > 0 for s in shape), "mesh", f"axis sizes must be > 0 or -1, got {shape}")
    _require(shape.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {shape}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
             f"must be <= model.max_seq_len={self.model.max_seq_len}, got {self.data.seq_len}")
    _require(not (self.train.base and self.model.weights), "train.base",
             "set either train.base or model.weights as the base, not both")
    _require(not self.train.freeze_base or bool(self.train.base or self.model.weights),
             "train.freeze_base", "needs a base to freeze: set train.base (a training workdir) "
             "or model.weights")
    _require(not self.train.lora_rank or self.train.freeze_base, "train.lora_rank",
             "needs train.freeze_base: true (LoRA adapts a frozen base)")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks.


def _check_value(value: Any, tp: Any, key: str) -> Any:
  """Returns `value` coerced to `tp`, or raises ConfigError naming `key`."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    _require(isinstance(value, dict), key, f"must be a mapping of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, prefix=key)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None:
      _require(type(None) in args, key, "must not be null")
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_value(value, arg, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0])
  if origin in (tuple, list):
    _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
    (elem, *rest) = typing.get_args(tp) or (Any,)
    return tuple(_check_value(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if tp is Any:
    return value
  if tp is bool:
    _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    return value
  if tp is int:
    _require(isinstance(value, int) and not isinstance(value, bool), key,
             f"must be an integer, got {value!r}")
    _require(-INT_LIMIT <= value < INT_LIMIT, key,  # what JAX's int32 holds
             f"must be an integer in [-2**31, 2**31), got {value}")
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads `3e-4` and `nan` as strings
      try:
        value = float(value)
      except ValueError:
        pass
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
             f"must be a number, got {value!r}")
    try:
      finite = math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
      finite = False
    _require(finite, key, f"must be finite, got {value!r}")
    return float(value)
  if tp is str:
    _require(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value
  raise TypeError(f"unsupported config field type {tp!r} at {key}")


# Keys that moved, so that a config written for an earlier version gets told where.
RENAMED = {"model.moa_plan": "model.moa.plan", "model.moa_block_size": "model.moa.block_size",
           "model.moa_sink_tokens": "model.moa.sink_tokens"}


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
  """Builds dataclass `cls` from `values`, rejecting unknown keys and wrong types."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  where = f"{prefix}." if prefix else ""
  for name in values:
    key = f"{where}{name}"
    _require(key not in RENAMED, key, f"renamed to {RENAMED.get(key)}")
    _require(name in fields, key, f"unknown key; allowed: {', '.join(sorted(fields))}")
  kwargs = {name: _check_value(v, hints[name], f"{where}{name}") for name, v in values.items()}
  return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = tree
  for i, part in enumerate(parents):
    child = node.setdefault(part, {})
    _require(isinstance(child, dict), ".".join(parents[: i + 1]), "is a value, not a section")
    node = child
  node[leaf] = value


def read_utf8(path: str | Path, allowed: str) -> str:
  """The text of file `path`; ConfigError naming the first byte that is not UTF-8."""
  try:
    return Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                      f"{e.start}); allowed: {allowed}") from None


def _one_line(e: yaml.YAMLError) -> str:
  """PyYAML's multi-line message as one line: the problem and where."""
  mark = getattr(e, "problem_mark", None)
  where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
  return f"{getattr(e, 'problem', None) or ' '.join(str(e).split())}{where}"


def parse_override(text: str) -> tuple[str, Any]:
  """`'model.num_layers=4'` -> `('model.num_layers', 4)`; values are parsed as YAML scalars."""
  key, sep, raw = text.partition("=")
  _require(bool(sep) and bool(key.strip()), text, "overrides look like section.key=value")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as e:
    raise ConfigError(f"{key}: cannot parse value {raw!r}: {_one_line(e)}") from None
  return key.strip(), value


def parse_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML config (or the defaults, if `path` is None) and applies overrides, checking
  every section on its own; `kvjax.load_config` then checks how the sections combine."""
  tree: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    _require(path.is_file(), "--config", f"no such file: {path}")
    try:
      tree = yaml.safe_load(read_utf8(path, "a YAML file")) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    _require(isinstance(tree, dict), str(path), "must be a mapping of sections")
  for text in overrides:
    key, value = parse_override(text)
    _set_path(tree, key, value)
  return from_dict(Config, tree)
