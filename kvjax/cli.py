"""What the command-line tools share: config arguments, the exit-2 error contract, and where
parameters come from."""

from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp

from kvjax.errors import ConfigError, UsageError
from kvjax.io import load_weights
from kvjax.models import build_model
from kvjax.training.checkpoint import restore_params


@contextlib.contextmanager
def usage_errors():
  """Turns config and usage errors into one line on stderr and exit code 2."""
  try:
    yield
  except (ConfigError, UsageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


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
