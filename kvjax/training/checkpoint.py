"""Checkpoints of a training run, the config that says what they are, and the base a run
starts from.

A workdir holds `config.yaml` (the resolved config) and `checkpoints/<step>/` written by an
async orbax `CheckpointManager` (keep-N; a step appears only once fully written, by an atomic
rename, and a temporary directory left by a killed writer is removed when the next run starts).
Each step has three items: `params`, `optimizer` (optimizer state, step, RNG) and `data` (the
grain iterator of every process), so a run resumes exactly where it stopped and a model loads
from `params` alone. A step that cannot be read is an error naming it; `train.py
--resume-from-previous` moves such steps to `unreadable/<step>` and resumes from the newest
readable one.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from kvjax.checks import load_config
from kvjax.config import Config, ModelConfig, TrainConfig
from kvjax.errors import CheckpointError, ConfigError
from kvjax.io import load_weights
from kvjax.models import build_model
from kvjax.training.params import init_trained, lora_scale, model_params, without_added
from kvjax.training.state import TrainState

CONFIG_FILE = "config.yaml"
UNREADABLE_DIR = "unreadable"  # where `restore_newest_readable` moves steps it cannot read


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / "checkpoints"


def save_config(workdir: str | Path, cfg: Config) -> None:
  """Writes `config.yaml` atomically: a run killed meanwhile leaves the old file or the new."""
  path = Path(workdir) / CONFIG_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  os.replace(tmp, path)


def check_data_config(workdir: str | Path, cfg: Config) -> None:
  """Raises ConfigError if `workdir` holds a run that read other data.

  A resumed run must read the same token stream, and its saved iterator state has the form
  `data.worker_count` gives it. (Model settings are checked against the saved parameters'
  shapes instead; `train.*` may change, e.g. to train for more steps.)
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return
  saved = (yaml.safe_load(path.read_text()) or {}).get("data", {})
  current = cfg.to_dict()["data"]
  diffs = [f"data.{k}={saved.get(k)!r} there, {current.get(k)!r} now"
           for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
  if diffs:
    raise ConfigError(f"{workdir} holds a run on other data ({'; '.join(diffs)}); use the same "
                      f"data settings, or another workdir")


def _manager(workdir: str | Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      "params": ocp.StandardCheckpointHandler(), "optimizer": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler()})


def make_manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  """The manager a training run saves through: async, keeping the latest `keep` steps."""
  return _manager(workdir, ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True))


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter) -> None:
  """Starts writing `state` and the data iterator's position (returns once both are copied)."""
  manager.save(int(state.step), args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      optimizer=ocp.args.StandardSave(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
      data=grain.checkpoint.CheckpointSave(data_iter)))


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint step whose files cannot be read (not one of another model)."""

  def __init__(self, what: str):
    super().__init__(f"{what}; `python train.py --resume-from-previous` resumes from the newest "
                     f"readable checkpoint, or use another workdir")
    self.what = what


def _drop_abandoned_reads(unraisable) -> None:
  """`sys.unraisablehook` without the noise of a failed restore (see `_quiet_abandoned_reads`)."""
  coroutine = isinstance(unraisable.object, types.CoroutineType)
  if coroutine and "/orbax/" in unraisable.object.cr_code.co_filename:
    return
  if isinstance(unraisable.exc_value, RuntimeError) and str(
      unraisable.exc_value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def _quiet_abandoned_reads() -> None:
  """When one read of a step fails, orbax's other reads of it end after its event loop has
  closed, and Python would print a traceback for each ("Event loop is closed") after the
  one-line error. Set before every restore: they may end before the error reaches this module."""
  sys.unraisablehook = _drop_abandoned_reads


def _unreadable(manager: ocp.CheckpointManager, step: int, e: Exception) -> CheckpointError:
  reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". See full")[0]
  return UnreadableCheckpointError(f"checkpoint step {step} in {manager.directory} cannot be "
                                   f"read ({type(e).__name__}: {reason})")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_params(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises ConfigError if the model of the current config has other parameters than step's."""
  _quiet_abandoned_reads()
  try:
    saved = _shapes(manager.item_metadata(step)["params"])
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files
    raise _unreadable(manager, step, e) from None
  wanted = _shapes(abstract_params)
  diffs = [f"{name} is {saved.get(name, 'absent')} there, {wanted.get(name, 'absent')} now"
           for name in sorted(saved.keys() | wanted.keys()) if saved.get(name) != wanted.get(name)]
  if diffs:
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise ConfigError(f"the model settings do not match checkpoint step {step} in "
                      f"{manager.directory}: {'; '.join(diffs[:3])}{more}; use the model "
                      f"settings it was trained with (its config.yaml), or another workdir")


def _restore(manager: ocp.CheckpointManager, step: int, **items):
  _quiet_abandoned_reads()
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files
    raise _unreadable(manager, step, e) from None


def restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
            data_iter) -> TrainState:
  """The state saved at `step`; moves `data_iter` to where it was."""
  _check_params(manager, step, abstract.params)
  restored = _restore(
      manager, step,
      params=ocp.args.StandardRestore(abstract.params),
      optimizer=ocp.args.StandardRestore(
          {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng}),
      data=grain.checkpoint.CheckpointRestore(data_iter))
  opt = restored.optimizer
  return TrainState(step=opt["step"], params=restored.params, opt_state=opt["opt_state"],
                    rng=opt["rng"])


def _set_aside(manager: ocp.CheckpointManager, step: int) -> Path:
  """Moves step's directory (orbax's default name: the step number) to `unreadable/`."""
  target = Path(manager.directory).parent / UNREADABLE_DIR / str(step)
  if jax.process_index() == 0:
    target.parent.mkdir(exist_ok=True)
    while target.exists():  # a step number set aside before
      target = target.with_name(target.name + "+")
    os.replace(Path(manager.directory) / str(step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"kvjax: checkpoint step {step} set aside")
  manager.reload()
  return target


def restore_newest_readable(manager: ocp.CheckpointManager, abstract: TrainState,
                            data_iter) -> TrainState | None:
  """The newest state that can be read (None: none can), moving every newer step aside.

  A step of another model is still an error (`ConfigError`): stepping back would not help.
  """
  start = data_iter.get_state()  # a failed restore may have moved the iterator already
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, step, abstract, data_iter)
    except UnreadableCheckpointError as e:
      moved = _set_aside(manager, step)
      if jax.process_index() == 0:
        print(f"{e.what}; moved to {moved}", file=sys.stderr)
  data_iter.set_state(start)
  return None


def load_base(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """The parameters a run starts from: a kvjax workdir's (`train.base`), a pretrained
  checkpoint's (`model.weights`, without what the model's methods add), or None."""
  if train_cfg.base:
    config_file = Path(train_cfg.base) / CONFIG_FILE
    if not config_file.is_file():
      raise ConfigError(f"train.base: {train_cfg.base} holds no training run (no {CONFIG_FILE})")
    return restore_params(train_cfg.base, load_config(config_file))
  if model_cfg.weights:
    return without_added(load_weights(model_cfg), model_cfg)
  return None


def restore_params(workdir: str | Path, cfg: Config):
  """The parameters of the latest checkpoint in `workdir`, for the model of `cfg.model`."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {workdir} (no {directory}); train one first with "
                          f"`python train.py --workdir {workdir}`")
  # Not `read_only=True`: that only adds warnings; this manager never saves.
  with _manager(workdir, ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {directory}; train one first with "
                            f"`python train.py --workdir {workdir}`")
    tcfg = cfg.train
    # With a frozen base, the run trained and saved only what the base lacks (and LoRA).
    base = load_base(cfg.model, tcfg) if tcfg.freeze_base else None
    init = functools.partial(init_trained, build_model(cfg.model), cfg.data.seq_len,
                             freeze_base=tcfg.freeze_base, lora_rank=tcfg.lora_rank,
                             lora_targets=tcfg.lora_targets)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), base)
    _check_params(manager, step, abstract)
    params = _restore(manager, step, params=ocp.args.StandardRestore(abstract)).params
    return model_params(base, params, lora_scale(tcfg))
