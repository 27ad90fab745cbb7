"""Joining a multi-process run with `jax.distributed`, before anything touches a device.

Every process of a multi-host job (a TPU pod slice, a SLURM allocation, several GPU hosts) runs
the same command; `initialize` connects them, after which `jax.devices()` lists the devices of
all processes and one mesh spans them. A process is part of such a run when
- explicit flags say so (`--coordinator host:port --num-processes N --process-id I`), or the
  environment does (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; what is
  left unset JAX fills in from the cluster);
- or a cluster that JAX detects by itself is present (SLURM with more than one task, Open MPI,
  a multi-host TPU slice on GKE), or `--distributed` asks JAX to detect it (Cloud TPU VM pods,
  whose workers JAX finds through the metadata server).
Otherwise it is a single-process run and nothing is initialised.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from kvjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  detect: bool = False  # let JAX find the cluster even if no known variable names one

  def __post_init__(self):
    if (self.num_processes is not None or self.process_id is not None) and not self.coordinator:
      raise ConfigError("--num-processes/--process-id: need --coordinator host:port (or "
                        "JAX_COORDINATOR_ADDRESS) too")
    if self.num_processes is not None and self.num_processes < 1:
      raise ConfigError(f"--num-processes: must be >= 1, got {self.num_processes}")
    if self.num_processes is not None and self.process_id is not None and not (
        0 <= self.process_id < self.num_processes):
      raise ConfigError(f"--process-id: must be in [0, {self.num_processes}), got {self.process_id}")


def add_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process runs (see kvjax.distributed)")
  group.add_argument("--distributed", action="store_true",
                     help="join a multi-process run that JAX detects (TPU pods, SLURM, MPI)")
  group.add_argument("--coordinator", help="host:port of process 0")
  group.add_argument("--num-processes", type=int)
  group.add_argument("--process-id", type=int)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}: must be an integer, got {value!r}") from None


def config_from(args: argparse.Namespace | None = None) -> DistributedConfig:
  """Flags first, then the `JAX_*` environment variables."""
  get = lambda name: None if args is None else getattr(args, name)
  return DistributedConfig(
      coordinator=get("coordinator") or os.environ.get("JAX_COORDINATOR_ADDRESS"),
      num_processes=get("num_processes") if get("num_processes") is not None
      else _env_int("JAX_NUM_PROCESSES"),
      process_id=get("process_id") if get("process_id") is not None
      else _env_int("JAX_PROCESS_ID"),
      detect=bool(get("distributed")))


def cluster_detected() -> bool:
  """Whether the environment names a multi-process job that JAX can configure itself."""
  env = os.environ
  slurm = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
  open_mpi = "OMPI_MCA_orte_hnp_uri" in env or "PMIX_SERVER_URI41" in env
  tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  return slurm or open_mpi or tpu_hosts


def initialize(cfg: DistributedConfig) -> bool:
  """Joins the run `cfg` (or the environment) describes; returns whether it is multi-process."""
  if cfg.coordinator is not None:
    jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
  elif cfg.detect or cluster_detected():
    jax.distributed.initialize()
  else:
    return False
  return jax.process_count() > 1

