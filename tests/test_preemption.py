"""train.py asked to stop (SIGTERM, SIGINT), killed outright (SIGKILL) at several moments, or
left with an unreadable checkpoint, then resumed: the run ends as one never interrupted (same
losses step by step, so the same data order, and the same parameters)."""

import functools
import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import kvjax
from kvjax.training import restore_params, train
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"  # train.py's default
RUN = ("train.batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_batches=1",
       "train.sample_tokens=0", "train.keep_checkpoints=2", "train.steps=1000")
TMP = ".orbax-checkpoint-tmp"


def run_overrides(text_dir, checkpoint_every: int) -> list[str]:
  return [*TINY, *RUN, f"data.source={text_dir}", f"train.checkpoint_every={checkpoint_every}",
          f"train.eval_every={checkpoint_every}"]


def start(env, workdir: Path, overrides, *flags) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir),
                           *flags, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
  """Polls `condition` every millisecond; False if `proc` ended first."""
  deadline = time.monotonic() + timeout
  while proc.poll() is None:
    if condition():
      return True
    assert time.monotonic() < deadline, "train.py never got there"
    time.sleep(0.001)
  return False


def logged_losses(workdir: Path) -> list[tuple[int, float]]:
  path = workdir / "metrics.jsonl"
  records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


def committed_steps(workdir: Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.is_dir()) else []


def writing(workdir: Path, after: int = -1) -> bool:
  """Whether a checkpoint of a step after `after` is being written."""
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(p.name.endswith(TMP) and int(p.name.split(".")[0]) > after
                                    for p in directory.iterdir())


def assert_same_run(cfg, workdir: Path, reference: Path) -> None:
  assert logged_losses(workdir) == logged_losses(reference)
  jax.tree.map(np.testing.assert_array_equal, restore_params(workdir, cfg),
               restore_params(reference, cfg))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_current_step_and_the_run_resumes_exactly(cli_env, text_dir,
                                                                        tmp_path, sig, code):
  overrides = run_overrides(text_dir, checkpoint_every=1000)  # only the signal saves
  workdir = tmp_path / "run"
  proc = start(cli_env, workdir, overrides)
  assert wait_for(proc, lambda: len(logged_losses(workdir)) >= 2)
  proc.send_signal(sig)
  wait_for(proc, lambda: writing(workdir))
  proc.send_signal(sig)  # a second one, during the save (or while the run exits), is ignored
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == code, err[-3000:]
  stopped = logged_losses(workdir)[-1][0]
  assert committed_steps(workdir) == [stopped]
  assert out == (f"{sig.name}: stopped after step {stopped}, its checkpoint is committed in "
                 f"{workdir}; run the same command to continue\n")
  assert "Traceback" not in err
  # The same run saving every step (what the other tests compile): the numbers do not change.
  cfg = kvjax.load_config(CONFIG, run_overrides(text_dir, checkpoint_every=1))
  train(cfg, workdir, stop_at=stopped + 2)
  train(cfg, tmp_path / "straight", stop_at=stopped + 2)
  assert_same_run(cfg, workdir, tmp_path / "straight")


def test_sigterm_to_one_process_stops_all_at_the_same_step(cli_env, text_dir, tmp_path):
  """Two processes over `jax.distributed`: JAX's preemption sync point picks the step."""
  overrides = run_overrides(text_dir, checkpoint_every=1000)
  workdir = tmp_path / "run"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [start({**cli_env, "JAX_PLATFORMS": "cpu"}, workdir, overrides, "--coordinator",
                 f"localhost:{port}", "--num-processes", "2", "--process-id", str(i))
           for i in range(2)]
  assert wait_for(procs[1], lambda: len(logged_losses(workdir)) >= 2)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
  stopped = logged_losses(workdir)[-1][0]
  assert committed_steps(workdir) == [stopped]
  data = workdir / "checkpoints" / str(stopped) / "data"
  assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json",
                                                           "process_1-of-2.json"]
  assert f"SIGTERM: stopped after step {stopped}, its checkpoint is committed" in outputs[0][0]


def test_killed_at_any_moment_the_run_resumes_from_its_last_commit_exactly(cli_env, text_dir,
                                                                           tmp_path):
  overrides = run_overrides(text_dir, checkpoint_every=1)
  workdir, last = tmp_path / "run", 8
  logged_after = lambda at: any(step > at for step, _ in logged_losses(workdir))
  moments = {  # moment: (reached, given the previous run's last commit `at`; then a delay)
      "during the first checkpoint write": (lambda at: writing(workdir), 0.0),
      "as soon as a checkpoint commits": (
          lambda at: max(committed_steps(workdir), default=0) > at, 0.0),
      "at a random time in training": (logged_after, np.random.default_rng(0).uniform(0, 0.5)),
      "during a later write (older steps being deleted)": (
          lambda at: writing(workdir, at + 1), 0.0),
  }
  at = 0
  for moment, (reached, delay) in moments.items():
    proc = start(cli_env, workdir, overrides, "--stop-at", str(last))
    assert wait_for(proc, functools.partial(reached, at)), f"the run ended before {moment}"
    time.sleep(delay)
    proc.kill()
    proc.wait()
    assert max(committed_steps(workdir), default=0) >= at, moment
    at = max(committed_steps(workdir), default=0)
  cfg = kvjax.load_config(CONFIG, overrides)
  assert train(cfg, workdir, stop_at=last).step == last
  train(cfg, tmp_path / "straight", stop_at=last)
  assert_same_run(cfg, workdir, tmp_path / "straight")


def load_train_cli():
  spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_resume_from_previous_steps_back_over_unreadable_checkpoints(text_dir, tmp_path, capsys):
  overrides = run_overrides(text_dir, checkpoint_every=1)
  cfg = kvjax.load_config(CONFIG, overrides)
  straight, workdir = tmp_path / "straight", tmp_path / "run"
  train(cfg, straight, stop_at=4)
  shutil.copytree(straight, workdir)
  assert committed_steps(workdir) == [3, 4]
  for f in (workdir / "checkpoints" / "4" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])
  cli = [*overrides, "--workdir", str(workdir), "--stop-at", "4"]
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    load_train_cli().main(cli)
  message = capsys.readouterr().err
  assert e.value.code == 2 and message.count("\n") == 1
  assert "checkpoint step 4 in " in message and "cannot be read" in message
  assert "python train.py --resume-from-previous" in message
  assert load_train_cli().main([*cli, "--resume-from-previous"]) == 0
  assert "cannot be read" in capsys.readouterr().err
  assert (workdir / "unreadable" / "4" / "params").is_dir()
  assert_same_run(cfg, workdir, straight)
