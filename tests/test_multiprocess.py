"""Two processes x 4 CPU devices over `jax.distributed` == one process, and their checkpoint restores.

The two processes (`python -m tests.test_multiprocess ID PORT DIR`) join through a coordinator
on localhost, build one 2x2x2 mesh over their 8 devices, each read their own grain shard of the
batches, train a few steps and save one orbax checkpoint together. This process (one device)
trains the same run as the reference and restores that checkpoint onto its own mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import kvjax
from kvjax import sharding
from kvjax.config import MeshConfig
from kvjax.data.pipeline import train_iterator
from kvjax.training.loss import loss_fn_for
from kvjax.training.optimizer import lr_schedule, make_optimizer
from kvjax.training.state import init_state
from kvjax.training.step import make_train_step
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 4, 3
LR = 0.001
OVERRIDES = (*TINY, "train.batch_size=8", "train.warmup_steps=0", f"train.lr={LR}",
             "data.seq_len=16")
# The processes' grain shards interleave, so the global batch holds the same rows in another
# order and every sum runs in another order; Adam moves a parameter by up to `lr` a step
# whatever its gradient's size, so near-zero gradients turn rounding into up to 10% of that.
LOSS_RTOL = 1e-5
PARAM_ATOL = 0.1 * LR


def _setup(mesh):
  """The config, state initialiser, abstract state, its shardings on `mesh` and the step."""
  cfg = kvjax.load_config(None, OVERRIDES)
  model = kvjax.build_model(cfg.model)
  optimizer = make_optimizer(cfg.train)
  init = lambda: init_state(model, optimizer, cfg.data.seq_len, jax.random.PRNGKey(cfg.train.seed))
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, sharding.abstract_params(model, cfg.data.seq_len),
                                       optimizer, mesh)
  step = sharding.shard_step(
      make_train_step(model, loss_fn_for(cfg.model.kind), optimizer, lr_schedule(cfg.train)),
      mesh, shardings, (cfg.train.batch_size, cfg.data.seq_len + 1))
  return cfg, init, abstract, shardings, step


def train(mesh):
  """`STEPS` steps on this process's grain shard of a fixed token stream; (state, losses)."""
  cfg, init, _, shardings, step = _setup(mesh)
  state = sharding.create_sharded(init, shardings)
  tokens = np.random.default_rng(0).integers(0, 256, 64 * (cfg.data.seq_len + 1), np.int32)
  batches = train_iterator(tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.data.seed)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, sharding.global_batch(next(batches), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


def run_process(process_id: int, port: int, directory: Path) -> None:
  from kvjax import distributed  # noqa: PLC0415

  assert distributed.initialize(distributed.DistributedConfig(
      coordinator=f"localhost:{port}", num_processes=NUM_PROCESSES, process_id=process_id))
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
  state, losses = train(sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / "state", state)
  if process_id == 0:
    (directory / "losses.json").write_text(json.dumps(losses))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  directory = tmp_path_factory.mktemp("multiprocess")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                       + f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}").strip()}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.test_multiprocess", str(i), str(port),
                             str(directory)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return directory


@pytest.fixture(scope="module")
def reference():
  """The same run in this single process, on one device."""
  return train(sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))


def test_training_across_processes_matches_one_process(run, reference):
  _, losses = reference
  np.testing.assert_allclose(json.loads((run / "losses.json").read_text()), losses,
                             rtol=LOSS_RTOL)


def test_checkpoint_written_by_both_processes_restores(run, reference):
  state, _ = reference
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  _, init, abstract, shardings, _ = _setup(mesh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(run / "state", sharding.with_shardings(abstract, shardings))
  max_diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))
  assert int(restored.step) == STEPS
  assert max_diff(restored.params, state.params) <= PARAM_ATOL
  assert max_diff(restored.params, sharding.create_sharded(init, shardings).params) > 2 * LR


if __name__ == "__main__":
  run_process(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
