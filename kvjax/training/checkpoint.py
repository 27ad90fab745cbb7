"""Checkpoints of a training run, the config that says what they are, and the base a run
starts from.

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

from kvjax.checks import load_config
from kvjax.config import Config, ModelConfig, TrainConfig
from kvjax.errors import CheckpointError, ConfigError
from kvjax.io import load_weights
from kvjax.models import build_model
from kvjax.training.params import init_trained, lora_scale, model_params, without_added
from kvjax.training.state import TrainState

CONFIG_FILE = "config.yaml"


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / "checkpoints"


def save_config(workdir: str | Path, cfg: Config) -> None:
  (Path(workdir) / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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
  return _manager(workdir, ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                        enable_async_checkpointing=True))


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter) -> None:
  """Starts writing `state` and the data iterator's position (returns once both are copied)."""
  manager.save(int(state.step), args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      optimizer=ocp.args.StandardSave(
          {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
      data=grain.checkpoint.CheckpointSave(data_iter)))


def _unreadable(manager: ocp.CheckpointManager, step: int, e: Exception) -> CheckpointError:
  reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return CheckpointError(
      f"checkpoint step {step} in {manager.directory} cannot be read ({type(e).__name__}: "
      f"{reason}); delete that step's directory to use an earlier one, or use another workdir")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_params(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises ConfigError if the model of the current config has other parameters than step's."""
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
