"""Errors a user can fix, each with a message that names what is wrong and what is allowed.

Every one is a `ValueError` the command-line tools print as one line, exiting with code 2.
This module imports nothing from kvjax, so every other module may raise these.
"""

import contextlib


class ConfigError(ValueError):
  """A config key or value that is not allowed; the message says which and why."""


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used; the message names the file and what is allowed."""


class FetchError(ConfigError):
  """A file the project fetches could not be downloaded, or is not where it should be."""


class UsageError(ValueError):
  """Bad command-line input that is not a config key (a flag value, a missing file)."""


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
