"""Compiles the Mosaic decode kernels for TPUs, without a TPU: every cache layout of every config
in configs/, bf16 and f32 (and bf16 values from int8, fp8 and int4 codes wherever eligibility
admits them), through the full TPU compiler (Mosaic's layout passes, VMEM
allocation) on compile-only topologies. Cross-lowering checks Pallas's block rules only; this
catches what Mosaic itself rejects.

  pip install libtpu   # the TPU compiler; no TPU needed
  TPU_WORKER_HOSTNAMES=localhost python -m benchmarks.kernels_tpu_compile [--topologies v5e:2x2 ...]

Writes benchmarks/results/kernels_tpu_compile.json (one row per topology x config x case x
dtype x code format).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
from jax.experimental import topologies

import kvjax
from benchmarks.common import RESULTS
from kvjax.pallas_kernels import eligibility
from kvjax.pallas_kernels.coverage import abstract_call, config_cases

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
# (value dtype, code format): float caches, and quantized ones with bf16 values
FORMATS = [("bfloat16", None), ("float32", None), ("bfloat16", ("int8", 0)),
           ("bfloat16", ("fp8", 0)), ("bfloat16", ("int4", 8))]


def tpu_eligible(case, dtype: str, quant) -> bool:
  return eligibility("tpu", case.layout, num_heads=case.num_heads,
                     num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, rows=case.rows,
                     dtype=dtype, block_size=case.block_size,
                     **({"quant": quant[0], "group": quant[1]} if quant else {})).ok


def compile_error(case, dtype: str, quant, device) -> str:
  """'' when the case's kernel compiles for `device`, else the compiler's first lines."""
  fn, args = abstract_call(case, dtype, "mosaic_tpu",
                           sharding=jax.sharding.SingleDeviceSharding(device), quant=quant)
  try:
    jax.jit(fn).trace(*args).lower().compile()
    return ""
  except Exception as e:  # noqa: BLE001 (any compiler failure is a result to report)
    return " | ".join(line for line in str(e).splitlines() if line.strip())[:500]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topologies", nargs="+", default=["v4:2x2x1", "v5e:2x2", "v5p:2x2x1",
                                                     "v6e:2x2"])
  args = p.parse_args()
  rows, seen = [], {}
  for name in args.topologies:
    device = topologies.get_topology_desc(topology_name=name, platform="tpu").devices[0]
    for path in CONFIGS:
      for case in config_cases(kvjax.load_config(path).model):
        for dtype, quant in FORMATS:
          if quant and not tpu_eligible(case, dtype, quant):
            continue
          key = (name, case, dtype, quant)
          t0 = time.perf_counter()
          if key not in seen:  # configs share shapes: compile each once per topology
            seen[key] = compile_error(case, dtype, quant, device)
          codes = "-".join(map(str, quant)) if quant else None
          rows.append(dict(topology=name, device_kind=device.device_kind, config=path.stem,
                           case=case._asdict(), dtype=dtype, codes=codes, error=seen[key],
                           seconds=time.perf_counter() - t0))
          print(f"{name} {path.stem} {case.layout} {case.num_heads}/{case.num_kv_heads}x"
                f"{case.head_dim} rows={case.rows} {dtype} {codes or ''}: "
                f"{seen[key] or 'ok'}", flush=True)
  failed = [r for r in rows if r["error"]]
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = RESULTS / "kernels_tpu_compile.json"
  out.write_text(json.dumps(dict(jax_version=jax.__version__, compiled=len(seen),
                                 failed=len(failed), rows=rows), indent=2))
  print(f"{len(seen)} distinct kernels compiled, {len(failed)} rows failed; wrote {out}")


if __name__ == "__main__":
  main()
