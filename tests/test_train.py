"""Training: exact resume, what a workdir records, checkpoint errors, NaN stop, train.py."""

import glob
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import kvjax
from kvjax.errors import CheckpointError, ConfigError
from kvjax.training import NonFiniteLossError, restore_params, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=128", "model.max_seq_len=64", "data.seq_len=32")
RUN = ("train.batch_size=4", "train.steps=6", "train.warmup_steps=2", "train.log_every=1",
       "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=2",
       "train.sample_tokens=12", "train.num_samples=2", "train.sample_prompt=thou")


@pytest.fixture(scope="module")
def cfg(text_dir):
  return kvjax.load_config(None, [*TINY, *RUN, f"data.source={text_dir}"])


def losses(workdir: Path) -> list[tuple[int, float]]:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def runs(cfg, tmp_path_factory):
  """The same 6 steps trained straight through, and as 3 steps, a stop, then a resume."""
  straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
  result = train(cfg, straight)
  first = train(cfg, resumed, stop_at=3)
  second = train(cfg, resumed)
  return straight, resumed, result, first, second


def test_resume_is_exact(cfg, runs):
  straight, resumed, result, first, second = runs
  assert (first.step, second.step, result.step) == (3, 6, 6)
  assert second.samples == result.samples
  assert losses(straight) == losses(resumed)
  assert [s for s, _ in losses(straight)] == list(range(1, 7))
  assert second.val_loss == result.val_loss
  assert_trees_equal(restore_params(straight, cfg), restore_params(resumed, cfg))


def test_training_lowers_the_loss(runs):
  straight, *_ = runs
  loss = [v for _, v in losses(straight)]
  assert loss[-1] < loss[0] - 0.5


def test_workdir_records_config_metrics_and_checkpoints(cfg, runs):
  straight, *_ = runs
  assert kvjax.load_config(straight / "config.yaml") == cfg
  assert sorted(p.name for p in (straight / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  tags = {(e.step, v.tag) for f in glob.glob(str(straight / "events.out.tfevents.*"))
          for e in EventFileLoader(f).Load() for v in e.summary.value}
  for tag in ("loss", "grad_norm", "lr", "tokens_per_s"):
    assert (6, tag) in tags
  assert (3, "val_loss") in tags and (6, "val_loss") in tags
  assert "val_loss" in (straight / "metrics.jsonl").read_text()


def test_other_settings_are_rejected_before_writing(cfg, runs, tmp_path):
  workdir = shutil.copytree(runs[0], tmp_path / "run")
  before = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
  other_model = kvjax.load_config(None, [*TINY, *RUN, f"data.source={cfg.data.source}",
                                         "model.mlp_dim=96"])
  message = r"layer_0/mlp/down/kernel is \(128, 64\) there, \(96, 64\) now; .* \(and 3 more\)"
  with pytest.raises(ConfigError, match=message):
    train(other_model, workdir)
  with pytest.raises(ConfigError, match=message):
    restore_params(workdir, other_model)
  other_data = kvjax.load_config(None, [*TINY, *RUN, f"data.source={cfg.data.source}",
                                        "data.seq_len=16"])
  with pytest.raises(ConfigError, match="data.seq_len=32 there, 16 now"):
    train(other_data, workdir)
  assert sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


def test_missing_checkpoint_is_a_clear_error(cfg, tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint in .*train one first"):
    restore_params(tmp_path / "never-trained", cfg)
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    restore_params(tmp_path / "empty", cfg)


def test_corrupt_checkpoint_is_a_clear_error(cfg, runs, tmp_path):
  workdir = shutil.copytree(runs[0], tmp_path / "run")
  for f in (workdir / "checkpoints" / "6" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="checkpoint step 6 in .* cannot be read"):
    restore_params(workdir, cfg)
  with pytest.raises(CheckpointError, match="checkpoint step 6 in .* cannot be read"):
    train(cfg, workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cfg, runs, tmp_path):
  workdir = shutil.copytree(runs[0], tmp_path / "run")
  good = restore_params(workdir, cfg)
  # Updates of size 1e30 overflow the activations within two steps.
  diverging = kvjax.load_config(None, [*TINY, *RUN, f"data.source={cfg.data.source}",
                                       "train.steps=12", "train.lr=1.0e+30",
                                       "train.checkpoint_every=1"])
  with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*last good checkpoint is step 6"):
    train(diverging, workdir)
  assert_trees_equal(restore_params(workdir, cfg), good)
  assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == 6


def load_train_cli():
  spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("override, message", [
    ("model.nope=1", "model.nope: unknown key; allowed: "),
    ("train.steps=many", "train.steps: must be an integer, got 'many'"),
])
def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, override, message):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
       "--workdir", str(tmp_path / "run"), override],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr == f"error: {proc.stderr.removeprefix('error: ').strip()}\n"
  assert message in proc.stderr
  assert list(tmp_path.iterdir()) == []


def test_cli_bad_flag_exits_2_with_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    load_train_cli().main(["--stop-at", "soon"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: argument --stop-at: invalid int value: 'soon'\n"


def test_cli_trains_then_prints_validation_loss_and_samples(cfg, tmp_path, capsys):
  workdir = tmp_path / "run"
  code = load_train_cli().main([
      "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(workdir), *TINY, *RUN,
      f"data.source={cfg.data.source}"])
  out = capsys.readouterr().out
  assert code == 0
  assert "step 6: validation loss " in out
  assert out.count("--- sample ---\nthou") == 2
  assert (workdir / "checkpoints" / "6").is_dir() and (workdir / "config.yaml").is_file()
