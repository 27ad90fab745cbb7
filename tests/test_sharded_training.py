"""`kvjax.training.train` on a 2x4 (data x fsdp) mesh of 8 simulated CPU devices == on one
device, and a workdir checkpointed on 2x4 resumes on 1x8.

XLA reads its device count once, at start, so the sharded runs happen in one child process
started with 8 host devices (`python -m tests.test_sharded_training TEXT_DIR OUT_DIR`); this
process keeps its single device and trains the reference run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax.training import train

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
STEPS, STOP_AT = 4, 2
RUN = ("model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
       "model.mlp_dim=128", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8",
       f"train.steps={STEPS}", "train.warmup_steps=0", "train.lr=0.001", "train.log_every=1",
       f"train.eval_every={STOP_AT}", f"train.checkpoint_every={STOP_AT}",
       "train.eval_batches=2", "train.sample_tokens=8", "train.num_samples=1",
       "train.sample_temperature=0", "train.sample_prompt=thou")
MESH_2X4 = ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")
MESH_1X8 = ("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1")
# One device and eight sum in different orders: float32 rounding, compounded over the steps.
LOSS_RTOL = 1e-5


def config(text_dir: Path, *mesh: str):
  return kvjax.load_config(None, [*RUN, f"data.source={text_dir}", *mesh])


def losses(workdir: Path) -> list[float]:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [m["loss"] for m in lines if "loss" in m]


def summary(workdir: Path, result) -> dict:
  return {"losses": losses(workdir), "step": result.step, "val_loss": result.val_loss,
          "samples": list(result.samples)}


# ------------------------------------------------------------------------------------------
# The child: everything that needs 8 devices.


def restored_placement(cfg, workdir: Path) -> dict:
  """Where the trainer's restore puts the latest checkpoint of `workdir` on `cfg.mesh`."""
  import jax  # noqa: PLC0415

  from kvjax.data.pipeline import make_data  # noqa: PLC0415
  from kvjax.training import checkpoint  # noqa: PLC0415
  from kvjax.training.step import compiled_steps  # noqa: PLC0415

  steps = compiled_steps(cfg.model, cfg.train, cfg.mesh, cfg.data.seq_len)
  with checkpoint.make_manager(workdir, cfg.train.keep_checkpoints) as manager:
    state = checkpoint.restore(manager, manager.latest_step(), steps.abstract,
                               make_data(cfg).train)
  table = state.params["embed"]["table"]["embedding"]
  shard = lambda x: list(x.addressable_shards[0].data.shape)
  return {"mesh": dict(table.sharding.mesh.shape), "num_devices": len(table.sharding.device_set),
          "table_shape": list(table.shape), "table_shard": shard(table),
          "opt_state_shards": [shard(x) for x in jax.tree.leaves(state.opt_state)
                               if x.shape == table.shape]}


def measure(text_dir: Path, out: Path) -> dict:
  import jax  # noqa: PLC0415

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  on_2x4, on_1x8 = config(text_dir, *MESH_2X4), config(text_dir, *MESH_1X8)
  straight, moved = out / "straight", out / "moved"
  report = {"straight": summary(straight, train(on_2x4, straight))}
  train(on_2x4, moved, stop_at=STOP_AT)
  report["restored"] = restored_placement(on_1x8, moved)
  report["moved"] = summary(moved, train(on_1x8, moved))
  return report


# ------------------------------------------------------------------------------------------
# The tests (one device here; the child has eight).


@pytest.fixture(scope="module")
def report(text_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                       + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()}
  proc = subprocess.run([sys.executable, "-m", "tests.test_sharded_training", str(text_dir),
                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(text_dir, tmp_path_factory):
  """The same run on this process's one device (the default mesh: 1x1x1)."""
  workdir = tmp_path_factory.mktemp("one_device")
  return summary(workdir, train(config(text_dir), workdir))


def test_training_on_a_2x4_mesh_matches_one_device(report, reference):
  r = report["straight"]
  assert r["step"] == STEPS and len(r["losses"]) == STEPS
  np.testing.assert_allclose(r["losses"], reference["losses"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(r["val_loss"], reference["val_loss"], rtol=LOSS_RTOL)
  assert reference["losses"][-1] < reference["losses"][0]  # the steps really train
  assert r["samples"] == reference["samples"]  # greedy samples from the sharded parameters


def test_checkpoint_from_2x4_restores_onto_the_1x8_mesh(report):
  r = report["restored"]
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["num_devices"] == NUM_DEVICES
  vocab, embed = r["table_shape"]
  assert r["table_shard"] == [vocab, embed // 8]  # parameters split along `embed` by fsdp
  # and their optimizer state with them (Adam's two moments)
  assert r["opt_state_shards"] == [[vocab, embed // 8]] * 2


def test_run_resumed_on_1x8_continues_the_2x4_run(report, reference):
  r = report["moved"]
  assert r["step"] == STEPS and len(r["losses"]) == STEPS  # steps 1-2 on 2x4, 3-4 on 1x8
  np.testing.assert_allclose(r["losses"], reference["losses"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(r["val_loss"], reference["val_loss"], rtol=LOSS_RTOL)
  assert r["samples"] == reference["samples"]


if __name__ == "__main__":
  print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]))))
