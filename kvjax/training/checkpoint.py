"""Checkpoints of a training run, and the config that says what they are.

A workdir holds `config.yaml` (the resolved config) and `checkpoints/<step>/` written by an
async orbax `CheckpointManager` (keep-N; a step appears only once fully written). Each step has
three items: `params`, `optimizer` (optimizer state, step, RNG) and `data` (the grain iterator
of every process), so a run resumes exactly where it stopped and a model loads from `params`
alone.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
import yaml

from kvjax.config import Config, ConfigError
from kvjax.io.errors import CheckpointError
from kvjax.models import build_model
from kvjax.training.state import TrainState, init_params

CONFIG_FILE = "config.yaml"
# Settings a run cannot change when it resumes: they decide the parameters' shapes and the data.
# (`train.*` may change, e.g. more steps; `data.worker_count` only changes how data is read.)
_FIXED_SECTIONS = ("model", "data")
_FREE_KEYS = {"data.worker_count"}


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / "checkpoints"


def _fixed_settings(tree: dict) -> dict[str, object]:
  return {f"{section}.{key}": value for section in _FIXED_SECTIONS
          for key, value in tree.get(section, {}).items()
          if f"{section}.{key}" not in _FREE_KEYS}


def check_config(workdir: str | Path, cfg: Config) -> None:
  """Raises ConfigError if `workdir` holds a run whose model or data settings differ."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return
  saved = _fixed_settings(yaml.safe_load(path.read_text()) or {})
  # A YAML round trip makes tuples lists, as in the saved file.
  current = _fixed_settings(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
  diffs = [f"{k}={saved.get(k)!r} there, {current.get(k)!r} now"
           for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
  if diffs:
    raise ConfigError(f"--workdir {workdir} holds a run with other settings ({'; '.join(diffs)}); "
                      f"use the same model and data settings, or another --workdir")


def save_config(workdir: str | Path, cfg: Config) -> None:
  (Path(workdir) / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def make_manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter) -> None:
  """Starts writing `state` and the data iterator's position (returns once both are copied)."""
  manager.save(int(state.step), args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      optimizer=ocp.args.StandardSave(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
      data=grain.checkpoint.CheckpointSave(data_iter)))


def _restore(manager: ocp.CheckpointManager, step: int, **items):
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} cannot be read ({type(e).__name__}: "
        f"{reason}); delete that step's directory to resume from an earlier one, or use another "
        f"--workdir") from None


def restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
            data_iter) -> TrainState:
  """The state saved at `step`; moves `data_iter` to where it was."""
  restored = _restore(
      manager, step,
      params=ocp.args.StandardRestore(abstract.params),
      optimizer=ocp.args.StandardRestore(
          {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng}),
      data=grain.checkpoint.CheckpointRestore(data_iter))
  opt = restored.optimizer
  return TrainState(step=opt["step"], params=restored.params, opt_state=opt["opt_state"],
                    rng=opt["rng"])


def restore_params(workdir: str | Path, cfg: Config):
  """The parameters of the latest checkpoint in `workdir` (a training run with config `cfg`)."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {workdir} (no {directory}); train one first with "
                          f"`python train.py --workdir {workdir}`")
  check_config(workdir, cfg)
  options = ocp.CheckpointManagerOptions(create=False)  # read_only=True only adds warnings
  with ocp.CheckpointManager(directory, options=options) as manager:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {directory}; train one first with "
                            f"`python train.py --workdir {workdir}`")
    init = functools.partial(init_params, build_model(cfg.model), cfg.data.seq_len)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    return _restore(manager, step, params=ocp.args.StandardRestore(abstract)).params
