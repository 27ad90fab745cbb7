"""The training loop behind `train.py`.

`train(cfg, workdir)` checks what it can before writing anything (the data settings of an
earlier run in the workdir, the data source, the sample prompt, then the model's parameter
shapes against the latest checkpoint), resumes from that checkpoint or starts at step 0, trains
to `train.steps`, evaluates every `eval_every` steps, checkpoints every `checkpoint_every` steps
and at the end, and returns the final validation loss with a few generated samples.

Metrics stay on the device between log, evaluation and checkpoint steps; there they are
fetched and checked. A non-finite loss or gradient stops the run before anything else is saved,
and a checkpoint of the very parameters that produced it is removed: the latest checkpoint left
is the last good one, whose own loss and gradient were finite.

SIGTERM or SIGINT during training (`kvjax.training.preemption`) ends the current step, saves that
step, waits for the checkpoint to commit and returns without evaluating or sampling, so a
preempted job loses no steps; the next call continues exactly. A process killed outright
resumes from the last committed checkpoint, and `metrics.jsonl` forgets the steps after it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax import sharding
from kvjax.config import Config
from kvjax.data.pipeline import make_data
from kvjax.models import build_model
from kvjax.training import checkpoint
from kvjax.training.metrics import MetricsWriter, Throughput, mean_metrics
from kvjax.training.preemption import StopSignals
from kvjax.training.samples import generate_samples, sample_prompt_ids
from kvjax.training.state import TrainState
from kvjax.training.step import Steps, compiled_steps


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss or gradient; the message names the step."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  step: int  # steps trained in total, earlier runs in the workdir included
  val_loss: float | None  # mean loss over the validation batches, nats/token (None: stopped)
  samples: tuple[str, ...]
  tokens_per_s: float | None  # training throughput of this call (None: under 2 steps ran)
  stopped_by: signal.Signals | None = None  # the signal that stopped it with a checkpoint


def evaluate(eval_step, params, batches: list[jax.Array]) -> float:
  """Mean loss over the fixed validation batches (all of one size, so mean nats/token)."""
  return float(np.mean(jax.device_get([eval_step(params, b) for b in batches])))


def _check_finite(history: list[dict], first_step: int, manager) -> None:
  """`history[i]` holds the metrics of step `first_step + i`, computed from the parameters
  after step `first_step + i - 1`."""
  for i, m in enumerate(history):
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      manager.wait_until_finished()
      for bad in [s for s in manager.all_steps() if s >= first_step + i - 1]:
        manager.delete(bad)
      kept = manager.latest_step()
      where = (f"the last good checkpoint is step {kept} in {manager.directory}" if kept is not None
               else "no good checkpoint is left")
      raise NonFiniteLossError(f"non-finite loss or gradient at step {first_step + i} (loss "
                               f"{m['loss']}, gradient norm {m['grad_norm']}); stopped, {where}")


def _restore_or_init(manager, steps: Steps, seed: int, data_iter,
                     resume_from_previous: bool) -> TrainState:
  if resume_from_previous:
    state = checkpoint.restore_newest_readable(manager, steps.abstract, data_iter)
  elif (step := manager.latest_step()) is not None:
    state = checkpoint.restore(manager, step, steps.abstract, data_iter)
  else:
    state = None
  if state is None:
    state = steps.init(jax.random.PRNGKey(seed))
  # A copy: the training step donates the whole state, so a second run in this process (on the
  # same compiled steps) would find the frozen base deleted.
  return state.replace(frozen=jax.tree.map(jnp.copy, steps.frozen))


def train(cfg: Config, workdir: str | Path, *, stop_at: int | None = None,
          resume_from_previous: bool = False) -> TrainResult:
  """Trains (or resumes) the run in `workdir` up to `train.steps`, or up to `stop_at` first.

  `stop_at` ends this call early with a checkpoint, as a preempted job would; the learning-rate
  schedule still runs to `train.steps`, so a later call continues the same run exactly.
  `resume_from_previous` resumes from the newest checkpoint that can be read, moving newer
  unreadable ones aside (`checkpoint.restore_newest_readable`).
  """
  workdir = Path(workdir)
  checkpoint.check_data_config(workdir, cfg)
  data = make_data(cfg)
  prompt_ids = sample_prompt_ids(cfg, data.tokenizer)
  steps = compiled_steps(cfg.model, cfg.train, cfg.mesh, cfg.data.seq_len)
  val_batches = [sharding.global_batch(b, steps.mesh) for b in data.val_batches]
  tcfg = cfg.train
  last = min(tcfg.steps, stop_at or tcfg.steps)
  is_main = jax.process_index() == 0

  with checkpoint.make_manager(workdir, tcfg.keep_checkpoints) as manager, StopSignals() as stop:
    state = _restore_or_init(manager, steps, tcfg.seed, data.train, resume_from_previous)
    if is_main:
      checkpoint.save_config(workdir, cfg)
    first = step = int(state.step)
    clock = Throughput(tcfg.batch_size * cfg.data.seq_len)
    history, unchecked, val_loss, postfix, stopping = [], [], None, {}, False
    with MetricsWriter(workdir, enabled=is_main, resumed_at=step) as writer, tqdm(
        total=tcfg.steps, initial=step, unit="step", disable=not is_main,
        dynamic_ncols=True) as bar:
      while step < last:
        state, metrics = steps.train_step(state, sharding.global_batch(next(data.train),
                                                                       steps.mesh))
        step += 1
        unchecked.append(metrics)
        if len(unchecked) > 1:  # one step in flight: a stop signal is acted on after the
          jax.block_until_ready(unchecked[-2])  # running step, not after all those queued
        bar.update()
        if step == first + 1:
          jax.block_until_ready(metrics)
          clock.mark(step)
        stopping = stop.reached(step, manager)
        log, evaluate_now, save_now = (step % every == 0 or step == last for every in (
            tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every))
        log, save_now = log or stopping, save_now or stopping
        if not (log or evaluate_now or save_now):
          continue
        fetched = jax.device_get(unchecked)
        clock.tick(step)
        _check_finite(fetched, step - len(fetched) + 1, manager)
        history += fetched
        unchecked = []
        if log:
          logged = mean_metrics(history)
          if (rate := clock.window_rate()) is not None:
            logged["tokens_per_s"] = rate
          writer.write(step, logged)
          postfix["loss"] = f"{logged['loss']:.4f}"
          history = []
        if evaluate_now:
          val_loss = evaluate(steps.eval_step, steps.model_params(state), val_batches)
          writer.write(step, {"val_loss": val_loss})
          postfix["val_loss"] = f"{val_loss:.4f}"
        if save_now:
          checkpoint.save(manager, state, data.train)
        bar.set_postfix(postfix)
        clock.mark(step)
        if stopping:
          break
    if stopping or stop.pending:  # (a signal after the last step skips the samples)
      manager.wait_until_finished()
      return TrainResult(step=step, val_loss=None, samples=(), tokens_per_s=clock.total_rate(),
                         stopped_by=stop.stopped_by)
    if val_loss is None:  # nothing left to train: the run was complete already
      val_loss = evaluate(steps.eval_step, steps.model_params(state), val_batches)
    samples = ()
    if tcfg.sample_tokens:
      rng = jax.random.fold_in(jax.random.PRNGKey(tcfg.seed), step)
      samples = tuple(generate_samples(build_model(cfg.model), steps.model_params(state), cfg,
                                       data.tokenizer, prompt_ids, rng))
    return TrainResult(step=step, val_loss=val_loss, samples=samples,
                       tokens_per_s=clock.total_rate())
