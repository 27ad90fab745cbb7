"""Llama-family GGUF files (llama.cpp's format): metadata, dequantized tensors, tokenizer.

Tensors come out under HF Llama names in HF layout (`[out, in]`), so one converter serves both
formats. llama.cpp stores Q and K projection rows permuted for its interleaved RoPE; `_unpermute`
restores the half-split order that kvjax (like HF) rotates.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from kvjax.errors import CheckpointError, reading_metadata
from kvjax.io.tokenizer import CheckpointTokenizer, tokenizer_from_gguf

_FLOAT_TYPES = ("F32", "F16", "F64")
_REQUIRED = object()

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _supported_types() -> tuple[str, ...]:
  from gguf import quants  # noqa: PLC0415

  return _FLOAT_TYPES + tuple(t.name for t in quants._type_traits)  # noqa: SLF001


def _hf_name(name: str, where: str) -> str:
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
  m = re.fullmatch(r"(\w+)\.weight", name)
  if m and m.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m.group(1)]}.weight"
  raise CheckpointError(f"{where}: tensor {name!r} is not part of a plain Llama model (no biases, "
                        f"no RoPE scaling tables); kvjax loads only those")


def _unpermute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's per-head row order (pairs interleaved) back to halves."""
  out, d_in = w_OxI.shape
  return w_OxI.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


@functools.lru_cache(maxsize=2)
def _read(path: Path, mtime_ns: int):
  """Parsed header and memory-mapped tensors, kept per file: parsing a 49k-token vocabulary
  takes seconds, and config, weights and tokenizer each open the file."""
  import gguf  # noqa: PLC0415

  del mtime_ns  # part of the cache key only
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 (gguf raises bare ValueError/struct errors)
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
  return reader, {k: f.contents() for k, f in reader.fields.items()}


class GGUFCheckpoint:
  """A `.gguf` file opened lazily (memory-mapped); tensors are dequantized on `tensors()`."""

  def __init__(self, path: Path):
    self.path = path
    self._reader, self.fields = _read(path.resolve(), path.stat().st_mtime_ns)
    arch = self.fields.get("general.architecture")
    if arch != "llama":
      raise CheckpointError(f"{path}: architecture {arch!r} is not supported; allowed: llama")
    scaling = self._get("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or self._get("rope.scaling.factor", 1.0) != 1.0:
      raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported; allowed: none")

  def _get(self, key: str, default: Any = _REQUIRED) -> Any:
    value = self.fields.get(f"llama.{key}", default)
    if value is _REQUIRED:
      raise CheckpointError(f"{self.path}: metadata llama.{key} is missing")
    return value

  @property
  def arch(self) -> dict[str, Any]:
    """The ModelConfig fields this checkpoint fixes."""
    with reading_metadata(str(self.path)):
      return self._arch()

  def _arch(self) -> dict[str, Any]:
    heads = self._get("attention.head_count")
    d_model = self._get("embedding_length")
    head_dim = self._get("attention.key_length", d_model // heads)
    rope_dim = self._get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
      raise CheckpointError(f"{self.path}: RoPE on {rope_dim} of {head_dim} head dims is not "
                            f"supported; allowed: rotary over the whole head")
    names = {t.name for t in self._reader.tensors}
    return dict(
        vocab_size=self._get("vocab_size", len(self.fields.get("tokenizer.ggml.tokens", ()))),
        d_model=d_model, num_layers=self._get("block_count"), num_heads=heads,
        num_kv_heads=self._get("attention.head_count_kv", heads), head_dim=head_dim,
        mlp_dim=self._get("feed_forward_length"), max_seq_len=self._get("context_length"),
        rope_theta=float(self._get("rope.freq_base", 10_000.0)),
        norm_eps=float(self._get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names)

  def tensors(self) -> dict[str, np.ndarray]:
    """Every tensor as float32 under its HF Llama name, in HF `[out, in]` layout."""
    from gguf import quants  # noqa: PLC0415

    arch = self.arch
    heads = {"self_attn.q_proj": arch["num_heads"], "self_attn.k_proj": arch["num_kv_heads"]}
    supported = _supported_types()
    out = {}
    for t in self._reader.tensors:
      kind = t.tensor_type.name
      if kind not in supported:
        raise CheckpointError(f"{self.path}: tensor {t.name} has type {kind}, which cannot be "
                              f"dequantized; allowed: {', '.join(supported)}")
      name = _hf_name(t.name, str(self.path))
      w = np.asarray(t.data) if kind in _FLOAT_TYPES else quants.dequantize(t.data, t.tensor_type)
      w = w.astype(np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
      for proj, n in heads.items():
        if proj in name:
          w = _unpermute(w, n)
      out[name] = w
    return out

  def tokenizer(self) -> CheckpointTokenizer:
    with reading_metadata(str(self.path)):
      return tokenizer_from_gguf(self.fields, str(self.path))
