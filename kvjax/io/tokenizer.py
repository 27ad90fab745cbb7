"""The tokenizer that comes with a checkpoint: HF `tokenizer.json`, or the GGUF metadata.

Both become one HF `tokenizers.Tokenizer`, so encoding matches the reference implementation
byte for byte. Control tokens (`<|im_start|>`, ...) are registered as special: they are matched
whole in text (a chat template's output) and dropped by `decode` unless asked for.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from kvjax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class CheckpointTokenizer:
  """`encode`/`decode` plus the ids and the chat template a checkpoint declares."""

  tokenizer: Any  # tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  add_bos: bool  # whether the model expects `bos_id` before every text
  chat_template: str | None = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`; special tokens written in the text are kept, none are added."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids, skip_special: bool = True) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

  def apply_chat_template(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Renders `[{"role": ..., "content": ...}]` with the checkpoint's Jinja chat template."""
    if self.chat_template is None:
      raise ValueError("this checkpoint has no chat template; pass plain text instead")
    import jinja2.sandbox  # noqa: PLC0415 (only chat models need jinja)

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    token = lambda i: None if i is None else self.tokenizer.id_to_token(i)
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=token(self.bos_id) or "", eos_token=token(self.eos_id) or "")


def _checkpoint_tokenizer(tokenizer, bos_id, eos_id, pad_id, chat_template, add_bos=None):
  if add_bos is None:  # HF post-processors add BOS themselves: ask one what it does.
    first = tokenizer.encode("", add_special_tokens=True).ids[:1]
    add_bos = bos_id is not None and first == [bos_id]
  pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
  return CheckpointTokenizer(tokenizer, bos_id, eos_id, pad, bool(add_bos), chat_template)


def tokenizer_from_hf_dir(path: Path) -> CheckpointTokenizer:
  """Reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` if present."""
  from tokenizers import Tokenizer  # noqa: PLC0415

  file = path / "tokenizer.json"
  if not file.is_file():
    raise CheckpointError(f"{path}: no tokenizer.json; kvjax reads HF fast-tokenizer files only")
  tokenizer = Tokenizer.from_file(str(file))
  config_file = path / "tokenizer_config.json"
  config = json.loads(config_file.read_text()) if config_file.is_file() else {}
  template_file = path / "chat_template.jinja"
  template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
  if isinstance(template, list):  # named templates: use the default one
    template = {t["name"]: t["template"] for t in template}.get("default")

  def token_id(key):
    tok = config.get(key)
    tok = tok.get("content") if isinstance(tok, dict) else tok
    return None if tok is None else tokenizer.token_to_id(tok)

  return _checkpoint_tokenizer(tokenizer, token_id("bos_token"), token_id("eos_token"),
                        token_id("pad_token"), template, config.get("add_bos_token"))


# GGUF `tokenizer.ggml.pre` -> the pre-tokenizer steps before byte-level BPE.
_GGUF_PRE = {"smollm": ("digits",), "gpt-2": (), "gpt2": (), "default": ()}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_from_gguf(fields: dict[str, Any], where: str) -> CheckpointTokenizer:
  """Builds the byte-level BPE a GGUF file describes (`tokenizer.ggml.*` metadata)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

  kind = fields.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise CheckpointError(f"{where}: tokenizer model {kind!r} is not supported; allowed: gpt2 "
                          f"(byte-level BPE)")
  pre = fields.get("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE:
    raise CheckpointError(f"{where}: pre-tokenizer {pre!r} is not supported; allowed: "
                          f"{', '.join(_GGUF_PRE)}")
  tokens = fields["tokenizer.ggml.tokens"]
  types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in _GGUF_PRE[pre] else []
  steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(
      [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
  tokenizer.add_tokens(
      [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
  return _checkpoint_tokenizer(tokenizer, fields.get("tokenizer.ggml.bos_token_id"),
                        fields.get("tokenizer.ggml.eos_token_id"),
                        fields.get("tokenizer.ggml.padding_token_id"),
                        fields.get("tokenizer.chat_template"),
                        fields.get("tokenizer.ggml.add_bos_token", False))
