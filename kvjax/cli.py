"""What the command-line tools share: config arguments, the exit-2 error contract (bad input
gets one line naming what is wrong and what is allowed, and nothing is written), and where
parameters come from."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from kvjax.errors import ConfigError, UsageError
from kvjax.io import load_weights
from kvjax.models import build_model
from kvjax.training.checkpoint import restore_params

SEED_RANGE = 2**32


@contextlib.contextmanager
def usage_errors():
  """Turns config and usage errors into one line on stderr and exit code 2."""
  try:
    yield
  except (ConfigError, UsageError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors keep the contract: one line (no usage block) and exit code 2."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def seed(text: str) -> int:
  """argparse type of a random seed: what both `jax.random.key` and NumPy take."""
  if not (text.isascii() and text.isdigit() and int(text) < SEED_RANGE):
    raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
  return int(text)


def check_utf8(flag: str, text: str) -> None:
  """Raises UsageError if `text` (from argv, where Python keeps undecodable bytes as lone
  surrogates) is not UTF-8."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
    what = f"byte {byte:#04x}" if byte is not None else f"character {text[e.start]!r}"
    raise UsageError(f"{flag}: not valid UTF-8 ({what} at position {e.start}); allowed: "
                     f"UTF-8 text") from None


def check_output(flag: str, path: str | Path | None, *, directory: bool = False) -> None:
  """Raises UsageError unless `path` can be written as a file (or as a directory), checked
  before any work so that a bad path neither wastes a run nor leaves half its output."""
  if path is None:
    return
  path = Path(path)
  kind = "directory" if directory else "file"
  if path.exists() and path.is_dir() != directory:
    raise UsageError(f"{flag} {path}: exists and is not a {kind}; allowed: a {kind} path")
  parent = next(p for p in path.absolute().parents if p.exists())
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {path}: cannot be created in {parent}; allowed: a {kind} path "
                     f"under a writable directory")


def add_config_args(parser) -> None:
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. model.num_layers=4 train.steps=30")


def load_params(cfg, checkpoint: str | None):
  """Trained params from a workdir, pretrained weights from `model.weights`, or random ones."""
  if checkpoint:
    return restore_params(checkpoint, cfg)
  if cfg.model.weights:
    return load_weights(cfg.model)
  print("note: no --checkpoint or model.weights; using random weights", file=sys.stderr)
  model = build_model(cfg.model)
  return model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
