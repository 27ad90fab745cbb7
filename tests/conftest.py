"""Fixtures shared by several test files."""

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
