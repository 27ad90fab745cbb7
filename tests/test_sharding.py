"""Sharded == one device, on 8 simulated CPU devices, for every model kind.

XLA reads its device count once, at start, so the measurements run in one child process started
with 8 host devices (`python -m tests.test_sharding`), and the rest of the suite keeps its single
device; the tests here assert on what the child reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvjax.config import MeshConfig
from kvjax.errors import ConfigError
from kvjax.models import MODELS as MODEL_REGISTRY
from kvjax.sharding import mesh_shape

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
TRAIN_STEPS = 2
# One device and eight sum in different orders: float32 rounding, compounded over the steps.
LOSS_RTOL = 1e-5
PARAM_ATOL = 3e-5  # 3% of one step's largest update (lr)

# Overrides that make each registered model kind; one layer per stack keeps compiling short.
KIND_OVERRIDES = {"block_transformer": ("model.block.block_len=4",)}
CASES = {kind: (f"model.kind={kind}", *KIND_OVERRIDES.get(kind, ())) for kind in MODEL_REGISTRY}
# The scanned stack also stores int4 codes and scales, split like plain values.
CASES["llama_scanned_cla2_int4"] = ("model.num_layers=4", "model.kv_sharing.factor=2",
                                    "model.scan_layers=true", "model.kv_quant.mode=int4")
COMMON = ("model.num_layers=1", "train.batch_size=8", "train.warmup_steps=0", "train.lr=0.001",
          "data.seq_len=16")
DECODE_BATCH, PROMPT_LEN, GEN_LEN = 4, 8, 8
MAIN_MESH = MeshConfig(data=2, fsdp=2, tensor=2)


# ------------------------------------------------------------------------------------------
# The child: everything that needs 8 devices.


def _train(cfg, model, mesh, tokens):
  """`TRAIN_STEPS` sharded steps from the initial state; returns (state, losses)."""
  import jax  # noqa: PLC0415

  from kvjax import sharding  # noqa: PLC0415
  from kvjax.training.loss import loss_fn_for  # noqa: PLC0415
  from kvjax.training.optimizer import lr_schedule, make_optimizer  # noqa: PLC0415
  from kvjax.training.state import init_state  # noqa: PLC0415
  from kvjax.training.step import make_train_step  # noqa: PLC0415

  optimizer = make_optimizer(cfg.train)
  init = lambda: init_state(model, optimizer, cfg.data.seq_len, jax.random.PRNGKey(cfg.train.seed))
  shardings = sharding.state_shardings(jax.eval_shape(init),
                                       sharding.abstract_params(model, cfg.data.seq_len),
                                       optimizer, mesh)
  state = sharding.create_sharded(init, shardings)
  step = sharding.shard_step(
      make_train_step(model, loss_fn_for(cfg.model.kind), optimizer, lr_schedule(cfg.train)),
      mesh, shardings, tokens.shape)
  losses = []
  for _ in range(TRAIN_STEPS):
    state, metrics = step(state, tokens)
    losses.append(float(metrics["loss"]))
  return state, shardings, losses


def _decode(cfg, model, params, mesh):
  """Greedy tokens from params placed as given, with the cache created sharded on `mesh`."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from kvjax import sharding  # noqa: PLC0415
  from kvjax.decode import generate, init_cache  # noqa: PLC0415
  from tests.helpers import random_tokens  # noqa: PLC0415

  init = lambda: init_cache(cfg.model, DECODE_BATCH, PROMPT_LEN + GEN_LEN)
  cache_shardings = sharding.cache_shardings(jax.eval_shape(init), mesh)
  cache = sharding.create_sharded(init, cache_shardings)
  kv = lambda tree: [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
                     if any(getattr(p, "name", None) in ("k", "v") for p in path[-2:])]
  kv_fraction = (sharding.device_bytes(kv(cache), mesh.devices.flat[0])
                 / sum(x.nbytes for x in kv(cache)))
  prompts = random_tokens(DECODE_BATCH, PROMPT_LEN, seed=1)
  lengths = jnp.array([PROMPT_LEN, 5, 3, PROMPT_LEN], jnp.int32)
  out = generate(model, params, prompts, lengths, max_new_tokens=GEN_LEN,
                 rng=jax.random.key(0), cache=cache)
  return np.asarray(out.tokens).tolist(), kv_fraction


def _param_bytes(cfg, model, fsdp: int) -> int:
  """Analytic per-device parameter bytes on a data x fsdp mesh of all devices."""
  from kvjax import sharding  # noqa: PLC0415

  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=fsdp, tensor=1))
  boxed = sharding.abstract_params(model, cfg.data.seq_len)
  return sharding.bytes_per_device(boxed, sharding.logical_shardings(boxed, mesh))


def _checkpoint(cfg, model, directory: Path) -> dict:
  """A state created on a 2x4 (data x fsdp) mesh, saved with orbax, restored onto 1x8."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from kvjax import sharding  # noqa: PLC0415
  from kvjax.training.optimizer import make_optimizer  # noqa: PLC0415
  from kvjax.training.state import init_state  # noqa: PLC0415

  optimizer = make_optimizer(cfg.train)
  init = lambda: init_state(model, optimizer, cfg.data.seq_len, jax.random.PRNGKey(cfg.train.seed))
  abstract = jax.eval_shape(init)
  boxed = sharding.abstract_params(model, cfg.data.seq_len)
  shardings_on = lambda mesh: sharding.state_shardings(abstract, boxed, optimizer, mesh)
  saved = sharding.create_sharded(init, shardings_on(sharding.make_mesh(MeshConfig(2, 4, 1))))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / "state", saved)
  target = shardings_on(sharding.make_mesh(MeshConfig(1, 8, 1)))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(directory / "state", sharding.with_shardings(abstract, target))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(saved),
                      jax.device_get(restored))
  table = restored.params["embed"]["table"]["embedding"]
  return {"equal": all(jax.tree.leaves(same)),
          "restored_mesh": dict(table.sharding.mesh.shape),
          "restored_spec": [a for a in table.sharding.spec],
          "table_shard": list(table.addressable_shards[0].data.shape),
          "table_shape": list(table.shape)}


def _decode_cli(directory: Path) -> dict:
  """decode.py's throughput test of a random tiny model on the 2x2x2 mesh of the config."""
  import decode  # noqa: PLC0415 (the command-line tool at the repository root)
  from tests.helpers import TINY  # noqa: PLC0415

  out = directory / "decode.json"
  decode.main(["--batch", str(DECODE_BATCH), "--prompt-len", str(PROMPT_LEN), "--gen-len", "4",
               "--json", str(out), *TINY, *COMMON, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  return json.loads(out.read_text())


def measure(directory: Path) -> dict:
  import jax  # noqa: PLC0415

  import kvjax  # noqa: PLC0415
  from kvjax import sharding  # noqa: PLC0415
  from tests.helpers import TINY, random_tokens  # noqa: PLC0415

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  eight = sharding.make_mesh(MAIN_MESH)
  tokens = np.asarray(random_tokens(8, 17, seed=2))
  report = {}
  for name, overrides in CASES.items():
    cfg = kvjax.load_config(None, [*TINY, *COMMON, *overrides])
    model = kvjax.build_model(cfg.model)
    state_1, _, losses_1 = _train(cfg, model, one, tokens)
    state_8, shardings_8, losses_8 = _train(cfg, model, eight, tokens)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         jax.device_get(state_1.params), jax.device_get(state_8.params))
    tokens_1, _ = _decode(cfg, model, state_1.params, one)
    tokens_8, kv_fraction = _decode(cfg, model, state_8.params, eight)
    report[name] = {
        "losses_1": losses_1, "losses_8": losses_8,
        "max_param_diff": max(jax.tree.leaves(diffs)),
        "params_sharded": sum(not s.is_fully_replicated
                              for s in jax.tree.leaves(shardings_8.params)),
        "num_params": len(jax.tree.leaves(shardings_8.params)),
        "tokens_1": tokens_1, "tokens_8": tokens_8, "cache_kv_fraction": kv_fraction,
        "param_bytes": {fsdp: _param_bytes(cfg, model, fsdp) for fsdp in (1, 2, 4, 8)},
        "state_bytes_analytic": sharding.bytes_per_device(state_8, shardings_8),  # from shapes
        "state_bytes_real": sharding.device_bytes(state_8, eight.devices.flat[0]),
    }
  cfg = kvjax.load_config(None, [*TINY, *COMMON])
  report["checkpoint"] = _checkpoint(cfg, kvjax.build_model(cfg.model), directory)
  report["decode_cli"] = _decode_cli(directory)
  return report


# ------------------------------------------------------------------------------------------
# The tests (one device here; the child has eight).


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sharding")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                       + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()}
  proc = subprocess.run([sys.executable, "-m", "tests.test_sharding", str(directory)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_sharded_train_step_matches_one_device(report, case):
  r = report[case]
  assert r["params_sharded"] == r["num_params"]  # every parameter is split on the 2x2x2 mesh
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=LOSS_RTOL)
  assert r["losses_8"][1] < r["losses_8"][0]  # the steps really update the parameters
  assert r["max_param_diff"] <= PARAM_ATOL


@pytest.mark.parametrize("case", CASES)
def test_sharded_decode_gives_the_same_tokens(report, case):
  r = report[case]
  assert r["tokens_8"] == r["tokens_1"]
  assert len(set(map(tuple, r["tokens_8"]))) > 1  # the prompts lead to different continuations


@pytest.mark.parametrize("case", CASES)
def test_cache_is_split_by_batch_and_kv_heads(report, case):
  # batch over data x fsdp (4), two KV heads over tensor (2)
  assert report[case]["cache_kv_fraction"] == pytest.approx(1 / NUM_DEVICES)


@pytest.mark.parametrize("case", CASES)
def test_parameter_bytes_per_device_shrink_by_the_fsdp_factor(report, case):
  r = report[case]
  assert r["state_bytes_real"] == r["state_bytes_analytic"]  # the analytic count is what is held
  for fsdp, nbytes in r["param_bytes"].items():
    assert nbytes * int(fsdp) == r["param_bytes"]["1"], fsdp


def test_decode_cli_runs_its_throughput_test_on_the_configs_mesh(report):
  r = report["decode_cli"]
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # batch 4 over data x fsdp, 2 KV heads over tensor: one eighth of the cache per device
  assert r["kv_cache_bytes_per_device"] * NUM_DEVICES == r["kv_cache_bytes"]
  assert r["cache_split"] == "batch, kv_heads" and r["decode_tokens_per_s"] > 0


def test_checkpoint_from_a_2x4_mesh_restores_on_1x8(report):
  r = report["checkpoint"]
  assert r["equal"]
  assert r["restored_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  vocab, embed = r["table_shape"]
  assert r["table_shard"] == [vocab, embed // 8]


# Mesh shapes need no devices.


@pytest.mark.parametrize("cfg, devices, shape", [
    (MeshConfig(), 8, (8, 1, 1)),
    (MeshConfig(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, fsdp=-1, tensor=4), 256, (1, 64, 4)),
    (MeshConfig(data=2, fsdp=4, tensor=1), 8, (2, 4, 1)),
])
def test_mesh_shape_fills_in_minus_one(cfg, devices, shape):
  assert mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize("cfg, devices, match", [
    (MeshConfig(data=-1, fsdp=3), 8, "must divide the 8 devices"),
    (MeshConfig(data=2, fsdp=2, tensor=1), 8, "there are 8 devices"),
])
def test_mesh_shape_rejects_what_does_not_fit(cfg, devices, match):
  with pytest.raises(ConfigError, match=match):
    mesh_shape(cfg, devices)


if __name__ == "__main__":
  print(json.dumps(measure(Path(sys.argv[1]))))
