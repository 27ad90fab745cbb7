"""Where training metrics go: TensorBoard scalars and `metrics.jsonl` in the workdir."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import tensorboard.summary

METRICS_FILE = "metrics.jsonl"


def flatten(metrics: dict) -> dict[str, float]:
  """Scalars stay; a vector `v` becomes `name/0`, `name/1`, ... (e.g. a loss per position)."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value, np.float64)
    if value.ndim == 0:
      flat[name] = float(value)
    else:
      flat.update({f"{name}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
  return flat


def mean_metrics(history: list[dict]) -> dict:
  """Per-name mean over consecutive steps' metrics."""
  return {name: np.mean([m[name] for m in history], axis=0) for name in history[0]}


def _logged_step(line: str) -> int | None:
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return None


def forget_after(path: Path, step: int) -> None:
  """Drops the records of steps after `step` (and a line torn by a kill) from a metrics file, so
  a run resumed from the checkpoint at `step` logs those steps once; atomic."""
  if not path.is_file():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines
          if line.endswith("\n") and (s := _logged_step(line)) is not None and s <= step]
  if kept != lines:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsWriter:
  """Writes scalars to TensorBoard event files and to `metrics.jsonl`; a no-op when disabled
  (every process but 0 in a multi-host run). `resumed_at`: the step training resumes from."""

  def __init__(self, workdir: Path, enabled: bool, resumed_at: int = 0):
    self.enabled = enabled
    if enabled:
      forget_after(workdir / METRICS_FILE, resumed_at)
      self._tb = tensorboard.summary.Writer(str(workdir))
      self._jsonl = open(workdir / METRICS_FILE, "a")  # noqa: SIM115 (closed on exit)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    flat = flatten(metrics)
    for name, value in flat.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
    self._tb.flush()
    self._jsonl.flush()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Throughput:
  """Training tokens/s that counts only the time spent in training steps.

  `mark(step)` restarts the clock (after the first step, which is mostly compilation, and after
  evaluation or checkpointing); `tick(step)` counts the steps and time since the last mark.
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.window = [0, 0.0]  # steps, seconds since the last `window_rate()`
    self.total = [0, 0.0]
    self._mark = None

  def mark(self, step: int) -> None:
    self._mark = (step, time.perf_counter())

  def tick(self, step: int) -> None:
    now = time.perf_counter()
    if self._mark is not None:
      for acc in (self.window, self.total):
        acc[0] += step - self._mark[0]
        acc[1] += now - self._mark[1]
    self._mark = (step, now)

  def _rate(self, steps: int, seconds: float) -> float | None:
    return steps * self.tokens_per_step / seconds if steps else None

  def window_rate(self) -> float | None:
    """Tokens/s since the previous call (None if no step was counted)."""
    rate = self._rate(*self.window)
    self.window = [0, 0.0]
    return rate

  def total_rate(self) -> float | None:
    return self._rate(*self.total)
