"""Errors for checkpoints and fetched files: `ConfigError`s, so CLIs report them in one line."""

from kvjax.config import ConfigError


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used; the message names the file and what is allowed."""


class FetchError(ConfigError):
  """A file the project fetches could not be downloaded, or is not where it should be."""
