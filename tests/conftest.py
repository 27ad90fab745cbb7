"""Fixtures shared by several test files."""

import os

import numpy as np
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Under `pytest -n --dist loadgroup`, a module's tests run on one worker unless they name a
  group of their own: a module-scoped fixture (a training run, an 8-device child process) is
  then built once, not once per worker."""
  for item in items:
    if item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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
