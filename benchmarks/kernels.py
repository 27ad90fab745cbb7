"""Decode kernels vs the memory-bandwidth limit: achieved GB/s next to the device's copy bandwidth.

  python -m benchmarks.kernels [--preset auto|cpu|gpu] [--repeats 3]

Times `shared_kv_decode` (Pallas), its XLA reference and, on a GPU, jax's own
`pallas.ops.gpu.decode_attention.gqa` on the same inputs, over batch x context for GQA 8:1 and
MQA (head dim 128, bf16); then `block_sparse_decode` at several densities against the dense
kernel. GB/s counts only the bytes a decode step needs: the valid K/V plus q and o. On a CPU the
Pallas kernels run in interpret mode, so only the `gpu` preset's numbers say anything about speed;
the `cpu` preset (small sizes, about a minute) keeps the script working. Writes
`benchmarks/results/kernels_<device>.json` (+ a PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import save_plot, write_json
from kvjax.pallas_kernels import (block_sparse_decode, block_sparse_decode_ref, shared_kv_decode,
                                  shared_kv_decode_ref)

HEAD_DIM = 128
DTYPE = jnp.bfloat16
HEADS = {"gqa8": (32, 4), "mqa": (32, 1)}  # (query heads, KV heads)
PRESETS = {
    "cpu": dict(batches=(1, 2), contexts=(256, 512), copy_mib=64, sparse_batch=2,
                sparse_context=512),
    "gpu": dict(batches=(1, 4, 16, 64), contexts=(1024, 4096, 16384, 32768, 131072),
                copy_mib=2048, sparse_batch=16, sparse_context=32768),
}
DENSITIES = (1.0, 0.5, 0.25, 0.125)
BLOCK_SIZE = 64


def seconds_per_call(fn, *args, repeats: int, min_window_s: float = 0.2) -> float:
  """Median over `repeats` windows of back-to-back calls (compile and one warm-up excluded)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = int(np.clip(min_window_s / max(time.perf_counter() - t0, 1e-6), 1, 200))
  windows = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - t0) / calls)
  return statistics.median(windows)


def copy_bandwidth(mib: int, repeats: int) -> float:
  """GB/s of a jitted elementwise pass (reads and writes every byte once)."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  t = seconds_per_call(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
  return 2 * x.nbytes / t / 1e9


def decode_bytes(batch: int, tokens: int, num_heads: int, num_kv_heads: int) -> int:
  """Bytes a decode step needs: K and V of the valid tokens, plus q in and o out."""
  item = jnp.dtype(DTYPE).itemsize
  return batch * item * HEAD_DIM * (2 * tokens * num_kv_heads + 2 * num_heads)


def jax_gqa():
  """jax's own split-K GQA decode kernel (GPU Triton), where this jax build ships it."""
  if jax.default_backend() != "gpu":
    return None
  from jax.experimental.pallas.ops.gpu import decode_attention  # noqa: PLC0415 (GPU only)
  return jax.jit(lambda q, k, v, lengths: decode_attention.gqa(q, k, v, kv_seq_len=lengths))


def dense_inputs(batch: int, context: int, num_heads: int, num_kv_heads: int):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, num_heads, HEAD_DIM), DTYPE)
  k, v = (jax.random.normal(key, (batch, context, num_kv_heads, HEAD_DIM), DTYPE)
          for key in keys[1:])
  return q, k, v, jnp.full((batch,), context, jnp.int32)


def bench_dense(preset: dict, repeats: int) -> list[dict]:
  impls = {"pallas": jax.jit(shared_kv_decode), "xla": jax.jit(shared_kv_decode_ref),
           "jax_decode_attention": jax_gqa()}
  rows = []
  for heads, (h, kh) in HEADS.items():
    for batch in preset["batches"]:
      for context in preset["contexts"]:
        args = dense_inputs(batch, context, h, kh)
        nbytes = decode_bytes(batch, context, h, kh)
        for impl, fn in impls.items():
          if fn is None:
            continue
          t = seconds_per_call(fn, *args, repeats=repeats)
          rows.append(dict(kernel="shared_kv_decode", impl=impl, heads=heads, batch=batch,
                           context=context, seconds=t, bytes=nbytes, gb_per_s=nbytes / t / 1e9))
          print(f"{heads} B={batch:<3d} ctx={context:<7d} {impl:<21s} {1e6 * t:10.1f} us "
                f"{nbytes / t / 1e9:8.1f} GB/s", flush=True)
        del args
  return rows


def sparse_inputs(batch: int, context: int, num_heads: int, num_kv_heads: int, density: float):
  """Each KV head owns `context` rows of a flat buffer and lists a random `density` of them."""
  blocks = context // BLOCK_SIZE
  listed = max(1, int(round(density * blocks)))
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (batch, num_heads, HEAD_DIM), DTYPE)
  k, v = (jax.random.normal(key, (batch, num_kv_heads * context, HEAD_DIM), DTYPE)
          for key in keys[1:3])
  order = jax.random.uniform(keys[3], (batch, num_kv_heads, blocks)).argsort(axis=-1)
  first = jnp.arange(num_kv_heads, dtype=jnp.int32) * blocks
  tables = jnp.sort(order[..., :listed], axis=-1).astype(jnp.int32) + first[None, :, None]
  num_tokens = jnp.full((batch, num_kv_heads), listed * BLOCK_SIZE, jnp.int32)
  return (q, k, v, tables, num_tokens), listed * BLOCK_SIZE


def bench_sparse(preset: dict, repeats: int) -> list[dict]:
  batch, context = preset["sparse_batch"], preset["sparse_context"]
  h, kh = HEADS["gqa8"]
  dense_t = seconds_per_call(jax.jit(shared_kv_decode), *dense_inputs(batch, context, h, kh),
                             repeats=repeats)
  impls = {"pallas": jax.jit(block_sparse_decode),
           "xla": jax.jit(functools.partial(block_sparse_decode_ref, block_size=BLOCK_SIZE))}
  rows = []
  for density in DENSITIES:
    args, tokens = sparse_inputs(batch, context, h, kh, density)
    nbytes = decode_bytes(batch, tokens, h, kh)
    for impl, fn in impls.items():
      t = seconds_per_call(fn, *args, repeats=repeats)
      rows.append(dict(kernel="block_sparse_decode", impl=impl, heads="gqa8", batch=batch,
                       context=context, density=density, seconds=t, bytes=nbytes,
                       gb_per_s=nbytes / t / 1e9, speedup_vs_dense_kernel=dense_t / t))
      print(f"sparse density={density:<6} {impl:<7s} {1e6 * t:10.1f} us "
            f"{nbytes / t / 1e9:8.1f} GB/s  x{dense_t / t:5.2f} vs dense", flush=True)
  return rows


def plot(result: dict) -> None:
  try:
    import matplotlib  # noqa: PLC0415 (optional)
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  dense = [r for r in result["rows"] if r["kernel"] == "shared_kv_decode"]
  sparse = [r for r in result["rows"] if r["kernel"] == "block_sparse_decode"]
  fig, axes = plt.subplots(1, len(HEADS) + 1, figsize=(6 * (len(HEADS) + 1), 4.5))
  for ax, heads in zip(axes, HEADS):
    for impl, style in (("pallas", "-"), ("xla", "--"), ("jax_decode_attention", ":")):
      for batch in result["preset"]["batches"]:
        pts = [(r["context"], r["gb_per_s"]) for r in dense
               if r["heads"] == heads and r["impl"] == impl and r["batch"] == batch]
        if pts:
          ax.plot(*zip(*pts), style, marker="o", label=f"{impl} B={batch}")
    ax.axhline(result["copy_gb_per_s"], color="k", lw=1, label="copy bandwidth")
    ax.set(xscale="log", xlabel="context", ylabel="GB/s", title=f"shared_kv_decode {heads}")
    ax.legend(fontsize=7)
  for impl in ("pallas", "xla"):
    pts = [(r["density"], r["speedup_vs_dense_kernel"]) for r in sparse if r["impl"] == impl]
    axes[-1].plot(*zip(*pts), marker="o", label=impl)
  axes[-1].plot(DENSITIES, [1 / d for d in DENSITIES], "k:", label="1/density")
  axes[-1].set(xscale="log", yscale="log", xlabel="density",
               ylabel="speedup vs dense Pallas kernel", title="block_sparse_decode")
  axes[-1].legend(fontsize=7)
  save_plot(fig, "kernels")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=("auto", *PRESETS), default="auto")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  name = args.preset if args.preset != "auto" else (
      "cpu" if jax.default_backend() == "cpu" else "gpu")
  preset = PRESETS[name]
  copy = copy_bandwidth(preset["copy_mib"], args.repeats)
  print(f"{jax.devices()[0].device_kind}: copy bandwidth {copy:.1f} GB/s", flush=True)
  result = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax_version=jax.__version__, interpret=jax.default_backend() == "cpu",
                preset=dict(name=name, **preset), head_dim=HEAD_DIM, dtype=jnp.dtype(DTYPE).name,
                block_size=BLOCK_SIZE, copy_gb_per_s=copy,
                rows=bench_dense(preset, args.repeats) + bench_sparse(preset, args.repeats))
  write_json("kernels", result)
  plot(result)


if __name__ == "__main__":
  main()
