"""Seeded training runs for the claim benchmarks: train (or reuse), score on held-out text, sum up.

A run lives in `<workdir>/<tag>`. Once trained it is scored on two held-out sets and the record
is written beside its checkpoints (`result.json`, atomically); with `resume` that record is read
instead, so a finished run is never trained or scored again, and an unfinished one continues
from its latest checkpoint (the trainer resumes exactly): a set of runs can span sittings. The
held-out sets: the tail of every training document (the trainer's validation split, in
distribution) and windows spread evenly over the World English Bible (another author and
register, never trained on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import kvjax
from kvjax.cli import UsageError
from kvjax.config import DataConfig, ModelConfig
from kvjax.data import get_tokenizer
from kvjax.data.corpus import load_documents, split_documents, web_bible_books
from kvjax.data.pipeline import token_stream, validation_batches
from kvjax.layers.cache import tree_nbytes
from kvjax.decode.throughput import measure
from kvjax.training import restore_params, train
from kvjax.training.loss import loss_fn_for

RESULT_FILE = "result.json"
HELD_OUT = {"tail": "the last 5% of every play (the trainer's validation split)",
            "web_bible": "the World English Bible (Debian sword-text-web), never trained on"}
SWEEP_LRS = (1e-3, 3e-3, 1e-2)
# The full-budget check's rates (`lr_check`): the sweep's and one below, as a whole budget can
# favour a smaller rate than a short run.
CHECK_LRS = (3e-4, *SWEEP_LRS)
# Every model's budget: 250 steps x 16 x 256 = 1,024,000 training tokens (bytes); 5% warmup;
# a checkpoint every 50 steps so that a run stopped part-way loses little.
BUDGET = ("train.steps=250", "train.batch_size=16", "data.seq_len=256", "train.warmup_steps=12",
          "train.eval_every=250", "train.checkpoint_every=50", "train.log_every=25",
          "train.eval_batches=16", "train.sample_tokens=0")
# The learning-rate sweep's short run: 60 steps x 8 x 256 = 123k tokens, seed 0.
SWEEP = ("train.steps=60", "train.batch_size=8", "train.warmup_steps=3", "train.eval_every=60",
         "train.checkpoint_every=60")


@dataclasses.dataclass(frozen=True)
class Run:
  model: str  # the name the benchmark reports it under
  config: str  # its yaml file
  overrides: tuple[str, ...]  # the budget, then the benchmark's and the user's overrides
  lr: float
  seed: int  # initialisation and data order: equal seeds, equal order for every model
  sweep: bool = False

  @property
  def tag(self) -> str:
    return f"{'sweep_' if self.sweep else ''}{self.model}_lr{self.lr:g}_seed{self.seed}"

  def cfg(self) -> kvjax.Config:
    return kvjax.load_config(self.config, [*self.overrides, f"train.lr={self.lr}",
                                           f"train.seed={self.seed}", f"data.seed={self.seed}"])


@functools.lru_cache(maxsize=4)
def held_out_batches(data: DataConfig, batch_size: int, num_batches: int) -> dict[str, list]:
  """name -> fixed `[batch_size, seq_len + 1]` token batches of each held-out set."""
  tokenizer = get_tokenizer(data.tokenizer)
  _, tails = split_documents(load_documents(data.source), data.val_fraction)
  streams = {"tail": token_stream([t for t in tails if t], tokenizer),
             "web_bible": token_stream(web_bible_books(), tokenizer)}
  return {name: validation_batches(tokens, data.seq_len, batch_size, num_batches)
          for name, tokens in streams.items()}


@functools.lru_cache(maxsize=16)
def _objective(model_cfg: ModelConfig):
  """The model's training objective with the trainer's fixed evaluation key, jitted."""
  model, loss_fn = kvjax.build_model(model_cfg), loss_fn_for(model_cfg.kind)
  return jax.jit(lambda params, tokens_BxT1: loss_fn(model, params, tokens_BxT1,
                                                     jax.random.PRNGKey(0)))


def score(model_cfg: ModelConfig, params, batches: list) -> dict:
  """Mean loss and mean logged metrics over equal-size batches, as the trainer evaluates."""
  outputs = jax.device_get([_objective(model_cfg)(params, jnp.asarray(b)) for b in batches])
  return {"loss": float(np.mean([loss for loss, _ in outputs])),
          **{k: np.mean([m[k] for _, m in outputs], axis=0).tolist() for k in outputs[0][1]}}


def _write_atomically(path: Path, record: dict) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=2))
  tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class Runner:
  """Trains and scores runs under `workdir`; `resume` reads finished runs' records instead,
  `report_only` reads them and trains nothing (an unfinished run then gives None)."""

  workdir: str
  resume: bool = False
  report_only: bool = False

  def __post_init__(self):
    # Without `resume`, a workdir holding earlier runs is refused rather than silently reused.
    if not (self.resume or self.report_only) and any(Path(self.workdir).glob("*/config.yaml")):
      raise UsageError(f"--workdir {self.workdir} holds runs already; pass --resume to reuse "
                       f"them (finished runs are read, unfinished ones continue), or use another "
                       f"workdir")

  def __call__(self, run: Run, extra=None) -> dict | None:
    """The run's record. `extra(cfg, params, batches) -> dict` adds the benchmark's own measures
    per held-out set; sweep runs keep only the trainer's validation loss."""
    rundir = Path(self.workdir) / run.tag
    path = rundir / RESULT_FILE
    if (self.resume or self.report_only) and path.is_file():
      return json.loads(path.read_text())
    if self.report_only:
      return None
    cfg = run.cfg()
    t0 = time.perf_counter()
    result = train(cfg, rundir)
    record = {"model": run.model, "config": run.config, "lr": run.lr, "seed": run.seed,
              "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
              "seq_len": cfg.data.seq_len, "val_loss": result.val_loss,
              "tokens_per_s": result.tokens_per_s, "wall_s": time.perf_counter() - t0,
              "device": jax.devices()[0].device_kind}
    if not run.sweep:
      params = restore_params(rundir, cfg)
      batches = held_out_batches(cfg.data, cfg.train.batch_size, cfg.train.eval_batches)
      record["held_out"] = {
          name: {**score(cfg.model, params, b), **(extra(cfg, params, b) if extra else {})}
          for name, b in batches.items()}
    _write_atomically(path, record)
    losses = " ".join(f"{k} {v['loss']:.4f}" for k, v in record.get("held_out", {}).items())
    print(f"{run.tag}: val {result.val_loss:.4f} {losses} ({record['wall_s']:.0f} s)", flush=True)
    return record


def sweep(families: dict[str, str], seed: int, overrides, runner: Runner,
          lrs=SWEEP_LRS) -> tuple[list[dict], dict[str, float]]:
  """Short runs of every family (name -> config) at every learning rate; each family's best."""
  runs = [runner(Run(name, config, (*BUDGET, *SWEEP, *overrides), lr, seed, sweep=True))
          for name, config in families.items() for lr in lrs]
  if None in runs:
    raise UsageError(f"the learning-rate sweep in {runner.workdir} is not finished; run without "
                     f"--report-only first")
  best = {name: min((r for r in runs if r["model"] == name), key=lambda r: r["val_loss"])["lr"]
          for name in families}
  return runs, best


def lr_check(runner: Runner, make: Callable[[str, float, int], tuple[Run, Any]], names, seeds,
             lrs=CHECK_LRS) -> tuple[list[dict], dict[str, float]]:
  """Every model at every learning rate on the full budget and every seed (`make(name, lr, seed)
  -> (run, extra)`), the check of the short sweep's choice. Returns the runs and, per model, the rate of lowest mean loss on
  the trainer's validation split (the tail set; the Bible set plays no part in the choice)."""
  runs = [runner(*make(name, lr, seed)) for seed in seeds for name in names for lr in lrs]
  if None in runs:
    raise UsageError(f"the full-budget learning-rate grid in {runner.workdir} is not finished; "
                     f"run without --report-only first")
  mean_val = lambda name, lr: np.mean([r["val_loss"] for r in runs
                                       if r["model"] == name and r["lr"] == lr])
  return runs, {name: min(lrs, key=lambda lr: mean_val(name, lr)) for name in names}


def train_models(runner: Runner, make: Callable[[str, float, int], tuple[Run, Any]],
                 lr_of: dict[str, float], seeds, check_lrs: bool
                 ) -> tuple[list[dict], dict[str, float] | None]:
  """Every model at its swept rate (`lr_of`) for every seed, finished runs only; with
  `check_lrs` the full-budget grid too (`lr_check`), whose best rates come back (else None)."""
  runs = [r for seed in seeds for name in lr_of if (r := runner(*make(name, lr_of[name], seed)))]
  if not check_lrs:
    return runs, None
  grid, best = lr_check(runner, make, lr_of, seeds)
  return distinct(runs + grid), best


def distinct(runs: list[dict]) -> list[dict]:
  """Each (model, learning rate, seed) once: the grid repeats the runs at the swept rate."""
  return list({(r["model"], r["lr"], r["seed"]): r for r in runs}.values())


def at_lrs(runs: list[dict], lr_of: dict[str, float]) -> list[dict]:
  """The runs of every model at its learning rate in `lr_of`."""
  return [r for r in runs if r["lr"] == lr_of.get(r["model"])]


def t_interval(values) -> dict:
  """Mean and 95% t-interval over seeds (no interval from a single seed)."""
  values = [float(v) for v in values]
  n, mean = len(values), float(np.mean(values))
  if n < 2:
    return {"mean": mean, "ci95": None, "n": n}
  half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def describe(interval: dict) -> str:
  """'2.3601 [2.3512, 2.3690]': a mean and its interval, for the log."""
  ci = interval["ci95"]
  return f"{interval['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def complete_seeds(runs: list[dict], models) -> list[int]:
  """The seeds for which every one of `models` has a finished run."""
  return sorted(set.intersection(*({r["seed"] for r in runs if r["model"] == m} for m in models)))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes of the cache `init_cache` builds, read off its shapes without allocating it."""
  return tree_nbytes(jax.eval_shape(lambda: kvjax.decode.init_cache(cfg, batch, max_len)))


def largest_batch(cfg: ModelConfig, budget_bytes: int, max_len: int) -> int:
  return budget_bytes // cache_bytes(cfg, 1, max_len)


def decode_at_budget(cfgs: dict[str, ModelConfig], budget_bytes: int, prompt_len: int,
                     gen_len: int) -> dict[str, dict]:
  """Each model's decode throughput at the largest batch whose cache fits `budget_bytes`, one
  after the other in this process (random weights: EOS is off, every sequence decodes)."""
  out = {}
  for name, cfg in cfgs.items():
    batch = largest_batch(cfg, budget_bytes, prompt_len + gen_len)
    if batch < 1:
      raise UsageError(f"{name}: one sequence's cache exceeds the budget of {budget_bytes:,} "
                       f"bytes; raise --cache-budget-mib")
    model = kvjax.build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    out[name] = measure(model, params, cfg, batch=batch, prompt_len=prompt_len, gen_len=gen_len)
    print(f"{name}: batch {batch} in {budget_bytes / 2**20:g} MiB, decode "
          f"{out[name]['decode_tokens_per_s']:,.0f} tok/s", flush=True)
  return out
