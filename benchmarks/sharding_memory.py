"""Per-device bytes of parameters, optimizer state and KV cache for the 85M models on 1, 8 and
256 devices, under `kvjax.sharding.RULES` and the meshes of the 8-GPU and v5e-256 configs.

The figures are analytic: shapes from `jax.eval_shape`, placed on an abstract mesh, no memory
allocated. The same count is checked against real arrays created sharded on 8 simulated CPU
devices (configs/tiny.yaml on a 2x2x2 mesh).

  python benchmarks/sharding_memory.py   # -> benchmarks/results/sharding_memory_<device>.json
"""

from __future__ import annotations

import os

# Eight host devices for the check against real arrays; XLA reads this once, at start.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import jax  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from kvjax import sharding  # noqa: E402
from kvjax.config import MeshConfig  # noqa: E402
from kvjax.decode import init_cache  # noqa: E402
from kvjax.training.optimizer import make_optimizer  # noqa: E402
from kvjax.training.state import init_state  # noqa: E402

MODELS = ("configs/vanilla_85m.yaml", "configs/block_85m.yaml")
MESHES = {1: MeshConfig(data=1, fsdp=1, tensor=1),
          8: kvjax.load_config("configs/gpu8_85m.yaml").mesh,
          256: kvjax.load_config("configs/v5e_256_85m.yaml").mesh}
CACHE_BATCH = 256  # sequences decoded at once (one per device on 256), at model.max_seq_len


def placed(cfg, mesh, cache_batch: int):
  """Abstract train state and cache, and their shardings on `mesh`."""
  model = kvjax.build_model(cfg.model)
  optimizer = make_optimizer(cfg.train)
  state = jax.eval_shape(functools.partial(init_state, model, optimizer, cfg.data.seq_len,
                                           jax.random.PRNGKey(0)))
  state_shardings = sharding.state_shardings(
      state, sharding.abstract_params(model, cfg.data.seq_len), optimizer, mesh)
  init = functools.partial(init_cache, cfg.model, cache_batch, cfg.model.max_seq_len)
  cache = jax.eval_shape(init)
  return state, state_shardings, cache, sharding.cache_shardings(cache, mesh), init


def per_device(cfg, mesh, cache_batch: int) -> dict[str, int]:
  state, state_sh, cache, cache_sh, _ = placed(cfg, mesh, cache_batch)
  out = {"params": sharding.bytes_per_device(state.params, state_sh.params),
         "optimizer": sharding.bytes_per_device(state.opt_state, state_sh.opt_state),
         "cache": sharding.bytes_per_device(cache, cache_sh)}
  return {**out, "total": sum(out.values())}


def check_on_devices() -> dict:
  """Analytic bytes vs the arrays really created sharded on the 8 local devices."""
  cfg = kvjax.load_config("configs/tiny.yaml")
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  state, state_sh, cache, cache_sh, init = placed(cfg, mesh, cache_batch=8)
  analytic = per_device(cfg, mesh, cache_batch=8)
  real_state = sharding.create_sharded(
      functools.partial(init_state, kvjax.build_model(cfg.model), make_optimizer(cfg.train),
                        cfg.data.seq_len, jax.random.PRNGKey(0)), state_sh)
  real_cache = sharding.create_sharded(init, cache_sh)
  device = mesh.devices.flat[0]
  real = {"params": sharding.device_bytes(real_state.params, device),
          "optimizer": sharding.device_bytes(real_state.opt_state, device),
          "cache": sharding.device_bytes(real_cache, device)}
  real["total"] = sum(real.values())
  return {"config": "configs/tiny.yaml", "mesh": dict(mesh.shape), "analytic": analytic,
          "real": real, "equal": analytic == real}


def main() -> None:
  figures = {}
  for path in MODELS:
    cfg = kvjax.load_config(path)
    figures[path] = {}
    for n, mesh_cfg in MESHES.items():
      mesh = sharding.abstract_mesh(mesh_cfg, n)
      figures[path][n] = {"mesh": dict(mesh.shape), **per_device(cfg, mesh, CACHE_BATCH)}
      print(f"{path:28s} {n:4d} devices {dict(mesh.shape)}: "
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in figures[path][n].items()
                        if k != "mesh"))
  check = check_on_devices()
  print(f"check on 8 devices ({check['config']}, mesh {check['mesh']}): analytic == real: "
        f"{check['equal']}")
  write_json("sharding_memory", {
      "what": "bytes per device: params, optimizer state (AdamW), KV cache",
      "cache": f"{CACHE_BATCH} sequences of model.max_seq_len positions, cache_dtype",
      "figures": figures, "check": check, "jax_version": jax.__version__})


if __name__ == "__main__":
  main()
