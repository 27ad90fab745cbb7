"""Errors for checkpoints and fetched files: `ConfigError`s, so CLIs report them in one line."""

import contextlib

from kvjax.config import ConfigError


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used; the message names the file and what is allowed."""


class FetchError(ConfigError):
  """A file the project fetches could not be downloaded, or is not where it should be."""


@contextlib.contextmanager
def reading_metadata(where: str):
  """Turns what interpreting a file's untrusted metadata raises (a missing key, a value of the
  wrong type, a zero head count; the `tokenizers` library raises bare `Exception`s) into a
  CheckpointError naming the file."""
  try:
    yield
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 (see above)
    reason = (str(e).strip().splitlines() or [""])[0]
    raise CheckpointError(f"{where}: malformed metadata ({type(e).__name__}: {reason})") from None
