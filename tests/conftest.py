"""Fixtures shared by several test files."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """A directory of three small, seeded plays made of a ten-word vocabulary."""
  d = tmp_path_factory.mktemp("text")
  rng = np.random.default_rng(0)
  words = ["thee", "thou", "art", "love", "night", "sweet", "my", "lord", "the", "and"]
  for i in range(3):
    lines = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    (d / f"play{i}.txt").write_text("\n".join(lines) + "\n")
  return d


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  """The environment of CLI subprocesses: one persistent XLA compilation cache, so that every run
  of a program after the first skips compiling it (the same executable, the same numbers)."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
