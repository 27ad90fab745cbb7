"""Shared by the benchmark scripts: where results go and how they are named, and how a CLI
command's result is recorded and reused."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def device_tag() -> str:
  """e.g. 'cpu' or 'nvidia-h100-80gb-hbm3': part of every result file name."""
  return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def write_json(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}_{device_tag()}.json"
  path.write_text(json.dumps(payload, indent=2))
  print(f"wrote {path}")
  return path


def save_plot(fig, name: str) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}_{device_tag()}.png"
  fig.savefig(path, dpi=120, bbox_inches="tight")
  print(f"wrote {path}")
  return path


def _with_out(cmd: list[str], out: Path | None) -> list[str]:
  """`cmd` told to write `out`, named relative to the repository (the commands run there), so
  that a record made in one checkout is found again in another."""
  if out is None or "--out" in cmd:
    return cmd
  return [*cmd, "--json", str(out.relative_to(ROOT))]


def _saved(out: Path) -> Path:
  return out.with_name(f"{out.stem}.record.json")


def saved_record(cmd: list[str], out: Path) -> dict | None:
  """The record `run` kept for this exact command, if any."""
  saved = _saved(out)
  if not saved.exists():
    return None
  record = json.loads(saved.read_text())
  command = shlex.join(_with_out(cmd, out)).replace(sys.executable, "python")
  return record if record["command"] == command else None


def run(cmd: list[str], out: Path | None = None, resume: bool = False) -> dict:
  """Runs one CLI command (given `--json out` unless it writes `--out`); returns its command
  line, wall time and JSON output, also kept beside the output (`resume` reuses that record when
  the command is the same). The commands share a persistent compilation cache (the same shapes
  recur from task to task)."""
  if resume and out is not None and (record := saved_record(cmd, out)):
    return record
  cmd = _with_out(cmd, out)
  command = shlex.join(cmd).replace(sys.executable, "python")
  print(f"$ {command}", flush=True)
  env = {"JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "kvjax-jax-cache"),
         **os.environ}
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, env=env)
  record = {"command": command, "wall_s": round(time.perf_counter() - start, 1)}
  if out is not None and out.suffix == ".json" and out.exists():
    record["result"] = json.loads(out.read_text())
    _saved(out).write_text(json.dumps(record, indent=2))
  return record


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
  """95% Wilson score interval of a proportion k / n."""
  p, z2 = k / n, z * z
  mid = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return [mid - half, mid + half]
