"""What the command-line tools share: config arguments and the exit-2 error contract."""

from __future__ import annotations

import contextlib
import sys

from kvjax.config import ConfigError


class UsageError(ValueError):
  """Bad command-line input that is not a config key (a flag value, a missing file)."""


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
