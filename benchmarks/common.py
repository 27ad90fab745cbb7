"""Shared by the benchmark scripts: where results go and how they are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


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
