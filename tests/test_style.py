"""Shape suffixes in the library use only the letters of the legend in kvjax's docstring."""

import re
from pathlib import Path

import kvjax

PACKAGE = Path(kvjax.__file__).parent
SUFFIX = re.compile(r"\b[a-z][a-z0-9_]*?_((?:[A-Z0-9]+x)*[A-Z0-9]+)\b")


def legend() -> set[str]:
  """The letters the docstring defines (`  X  meaning` entries, two per line)."""
  return set(re.findall(r"(?:^|\s{2,})([A-Z])  \w", kvjax.__doc__, re.M))


def test_the_legend_defines_every_letter_once():
  letters = re.findall(r"(?:^|\s{2,})([A-Z])  \w", kvjax.__doc__, re.M)
  assert len(letters) == len(set(letters)) >= 20


def test_every_shape_suffix_uses_legend_letters():
  known = legend() | set("0123456789")
  unknown = {}
  for path in PACKAGE.rglob("*.py"):
    for m in SUFFIX.finditer(path.read_text()):
      suffix = m.group(1)
      if any(c.isupper() for c in suffix) and set(suffix.replace("x", "")) - known:
        unknown.setdefault(str(path.relative_to(PACKAGE)), set()).add(m.group(0))
  assert not unknown, unknown
