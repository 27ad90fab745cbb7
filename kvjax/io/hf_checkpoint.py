"""HF-format Llama checkpoints: a directory with `config.json` and `*.safetensors` shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvjax.config import read_utf8
from kvjax.errors import CheckpointError, reading_metadata
from kvjax.io.tokenizer import CheckpointTokenizer, tokenizer_from_hf_dir

ARCHITECTURES = ("LlamaForCausalLM",)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older exports saved; recomputed here


class HFCheckpoint:
  """An HF Llama directory; `config.json` is checked on open, tensors are read on `tensors()`."""

  def __init__(self, path: Path):
    self.path = path
    config_file = path / "config.json"
    if not config_file.is_file():
      raise CheckpointError(f"{path}: no config.json; an HF checkpoint directory holds "
                            f"config.json and *.safetensors")
    try:
      self.config: dict[str, Any] = json.loads(read_utf8(config_file, "a JSON file"))
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(self.config, dict):
      raise CheckpointError(f"{config_file}: must be a JSON object, got "
                            f"{type(self.config).__name__}")
    with reading_metadata(str(config_file)):
      self._check_supported()
    self.shards = sorted(path.glob("*.safetensors"))
    if not self.shards:
      raise CheckpointError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not "
                            f"read; convert them with safetensors first)")

  def _check_supported(self) -> None:
    c, path, config_file = self.config, self.path, self.path / "config.json"
    archs = c.get("architectures") or [c.get("model_type")]
    if not set(archs) & set(ARCHITECTURES):
      raise CheckpointError(f"{path}: architecture {', '.join(map(str, archs))} is not supported; "
                            f"allowed: {', '.join(ARCHITECTURES)}")
    unsupported = {"hidden_act": (c.get("hidden_act", "silu"), "silu"),
                   "attention_bias": (c.get("attention_bias", False), False),
                   "mlp_bias": (c.get("mlp_bias", False), False),
                   "rope type": (self._rope().get("rope_type", "default"), "default")}
    for key, (got, allowed) in unsupported.items():
      if got != allowed:
        raise CheckpointError(f"{config_file}: {key}={got!r} is not supported; allowed: {allowed!r}")

  def _rope(self) -> dict[str, Any]:
    """RoPE settings: `rope_parameters` (transformers 5) or top-level keys (transformers 4)."""
    c = self.config
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope.setdefault("rope_theta", c.get("rope_theta", 10_000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope

  @property
  def arch(self) -> dict[str, Any]:
    """The ModelConfig fields this checkpoint fixes."""
    with reading_metadata(str(self.path / "config.json")):
      return self._arch()

  def _arch(self) -> dict[str, Any]:
    c = self.config
    heads = c["num_attention_heads"]
    return dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(self._rope()["rope_theta"]), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))

  def tensors(self) -> dict[str, np.ndarray]:
    """Every tensor as float32 under its HF name (safetensors keeps HF's `[out, in]` layout)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    out = {}
    for shard in self.shards:
      try:
        loaded = load_file(shard)
      except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from None
      out.update({k: v.astype(np.float32) for k, v in loaded.items()
                  if not k.endswith(_IGNORED_SUFFIXES)})
    return out

  def tokenizer(self) -> CheckpointTokenizer:
    with reading_metadata(str(self.path)):
      return tokenizer_from_hf_dir(self.path)
