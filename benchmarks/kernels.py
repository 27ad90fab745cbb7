"""Decode kernels against the memory roofline, XLA and jax's own decode kernel.

  python -m benchmarks.kernels [--preset auto|cpu|gpu] [--repeats 3] [--sections dense ...]

Sections, all bf16 with head dim 128 (GQA 32:8 and MQA 32:1):
- roofline: GB/s of a copy (each byte read and written) and of a read-only reduction.
- dense: `shared_kv_decode`, its XLA reference and jax's `decode_attention` (when this jax
  ships it) over batch x context at full length. jax's `gqa` transposes K/V to head-major (a
  copy of the cache) on every call: its kernel is timed on pre-transposed buffers, and `gqa`
  with its transpose as a separate row.
- ragged: one capacity, valid lengths 1/16 .. 1 of it (and a batch of mixed lengths): the
  kernels read only the valid tokens, the XLA reference reads the whole buffer.
- quant: GQA dense decode from int8 and int4 caches (one bfloat16 scale per head; bf16 query)
  beside the bf16 cache, timed side by side in one run: the kernel reads codes and scales and
  dequantizes in the kernel, the XLA reference dequantizes the whole cache, then attends.
  `speedup_vs_bf16` is the bf16 kernel's time over each row's, on the same shape.
- sparse: `block_sparse_decode` at densities 1 .. 1/16 of the blocks, with the least-squares
  fit `t = fixed + density * per_density`.
- big (GPU): a K/V buffer over 4 GiB, so the kernel's 64-bit offsets are exercised.
Every timed implementation's output is checked against a float32 reference at HIGHEST
precision on the same inputs (max abs error in the JSON; a failure is reported, not hidden).
Device time per call: n calls inside one jitted loop whose carry feeds each call's query (no
call can be hoisted or dropped), the medians of `--repeats` runs of 1 and of 1+n calls
differenced so dispatch cancels. GB/s counts only what a decode step must read: the valid K/V,
q and o.
The `cpu` preset (small sizes; Pallas in interpret mode, so its times say nothing about
kernels) proves the script end to end. Writes benchmarks/results/kernels_<device>.{json,png}.
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
from kvjax.quant import dequantize, quantize
from kvjax.quant.storage import QuantStorage

try:  # deprecated in jax; may be absent from the jax a GPU machine has
  from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode_attention
except ImportError:
  jax_decode_attention = None

HEAD_DIM, DTYPE, BLOCK = 128, jnp.bfloat16, 64
HEADS = {"gqa": (32, 8), "mqa": (32, 1)}  # (query heads, KV heads)
DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)
FRACTIONS = (0.0625, 0.125, 0.25, 0.5, 1.0)
PRESETS = {
    "cpu": dict(batches=(1,), contexts=(256, 512), roofline_mib=64, ragged=(2, 512),
                sparse=(2, 512), quant=(1, (256,)), big=None, window_s=0.05),
    "gpu": dict(batches=(1, 16), contexts=(4096, 32768, 131072), roofline_mib=4096,
                ragged=(16, 32768), sparse=(16, 32768), quant=(16, (32768,)),
                big=(18, 131072), window_s=0.05),
}
TOLERANCE = 2e-2  # bf16 K/V and probabilities against a float32 reference
QUANT_MODES = ("int8", "int4")


def device_seconds(fn, args, repeats: int, window_s: float) -> float:
  """Seconds per call of `fn(q, *rest) -> like q`, from calls chained inside one jitted loop."""
  @jax.jit
  def chained(n, q, *rest):
    step = lambda _, q: q + (fn(q, *rest) * 1e-6).astype(q.dtype)  # a data dependency
    return jax.lax.fori_loop(0, n, step, q)

  def wall(n):
    t0 = time.perf_counter()
    jax.block_until_ready(chained(n, *args))
    return time.perf_counter() - t0

  wall(1)  # compile
  n = int(np.clip(window_s / (wall(4) / 4), 4, 5000))  # wall(4) / 4 >= a call: n stays small
  many = statistics.median(wall(1 + n) for _ in range(repeats))
  return (many - statistics.median(wall(1) for _ in range(repeats))) / n


def max_error(out, want) -> float:
  return float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))


def highest(fn):
  """`fn` on float32 inputs at HIGHEST matmul precision: the reference every output meets."""
  def run(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
      return jax.jit(functools.partial(fn, **kwargs))(*up)
  return run


def roofline(mib: int, repeats: int, window_s: float) -> dict:
  """Copy (read + write) and read-only GB/s over a `mib` buffer."""
  x = jnp.ones((mib * 2**20 // 2,), DTYPE)
  copy = device_seconds(lambda x: x + 1, (x,), repeats, window_s)
  read = device_seconds(lambda c, x: jnp.mean(x * c[0], keepdims=True, dtype=jnp.float32),
                        (jnp.ones((1,), DTYPE), x), repeats, window_s)
  return dict(copy_gb_per_s=2 * x.nbytes / copy / 1e9, read_gb_per_s=x.nbytes / read / 1e9)


def decode_bytes(batch: int, tokens: float, num_heads: int, num_kv_heads: int,
                 entry_bytes: float = HEAD_DIM * jnp.dtype(DTYPE).itemsize) -> float:
  """What a decode step must move: K and V of the valid tokens (`entry_bytes` per token and
  head: D values, or codes and scales), q in and o out."""
  q_bytes = HEAD_DIM * jnp.dtype(DTYPE).itemsize
  return batch * (2 * tokens * num_kv_heads * entry_bytes + 2 * num_heads * q_bytes)


def dense_inputs(seed: int, batch: int, context: int, num_heads: int, num_kv_heads: int):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, num_heads, HEAD_DIM), DTYPE)
  k, v = (jax.random.normal(key, (batch, context, num_kv_heads, HEAD_DIM), DTYPE)
          for key in keys[1:])
  return q, k, v


def jax_kernel_head_major(q, k_BxKxSxD, v_BxKxSxD, lengths):
  """jax's split-K kernel on K/V already `[B, K, S, D]` (what its `gqa` transposes to)."""
  b, h, d = q.shape
  kh = k_BxKxSxD.shape[1]
  mqa = functools.partial(jax_decode_attention.mqa, kv_seq_len=lengths)
  out = jax.vmap(mqa, in_axes=(1, 1, 1), out_axes=1)(q.reshape(b, kh, h // kh, d), k_BxKxSxD,
                                                      v_BxKxSxD)
  return out.reshape(b, h, d)


def jax_gqa_transposing(q, k, v, lengths):
  """jax's `gqa` with its K/V transpose on every call: the buffers are scaled by an exact 1 that
  depends on q, since a loop would otherwise hoist the transpose of loop-invariant K/V."""
  one = 1 + 0 * q[0, 0, 0]
  return jax_decode_attention.gqa(q, k * one, v * one, kv_seq_len=lengths)


def dense_impls(q, k, v, lengths) -> dict:
  """name -> (fn(q, *rest), rest): the same attention by each implementation."""
  impls = {"pallas": (shared_kv_decode, (k, v, lengths)),
           "xla": (shared_kv_decode_ref, (k, v, lengths))}
  if jax_decode_attention is not None and jax.default_backend() == "gpu":
    kt, vt = (jnp.swapaxes(x, 1, 2) for x in (k, v))
    impls["jax_decode_attention"] = (jax_kernel_head_major, (kt, vt, lengths))
    impls["jax_gqa_with_transpose"] = (jax_gqa_transposing, (k, v, lengths))
  return impls


def time_and_check(row: dict, impls: dict, q, want, nbytes: float, args) -> list[dict]:
  rows = []
  for impl, (fn, rest) in impls.items():
    t = device_seconds(fn, (q, *rest), args.repeats, args.window_s)
    err = max_error(jax.jit(fn)(q, *rest), want)
    rows.append(dict(row, impl=impl, seconds=t, gb_per_s=nbytes / t / 1e9, max_abs_err=err,
                     ok=err < TOLERANCE))
    print(f"{row} {impl:<21s} {1e6 * t:10.1f} us {nbytes / t / 1e9:8.1f} GB/s err {err:.1e}",
          flush=True)
  return rows


def bench_dense(preset: dict, args) -> list[dict]:
  rows = []
  for heads, (h, kh) in HEADS.items():
    for batch in preset["batches"]:
      for context in preset["contexts"]:
        q, k, v = dense_inputs(0, batch, context, h, kh)
        lengths = jnp.full((batch,), context, jnp.int32)
        want = highest(shared_kv_decode_ref)(q, k, v, lengths)
        row = dict(section="dense", heads=heads, batch=batch, context=context, length=context)
        impls = dense_impls(q, k, v, lengths)
        rows += time_and_check(row, impls, q, want, decode_bytes(batch, context, h, kh), args)
        del q, k, v, impls
  return rows


def bench_ragged(preset: dict, args) -> list[dict]:
  """Fixed capacity, growing valid length (and one batch of mixed lengths)."""
  batch, capacity = preset["ragged"]
  h, kh = HEADS["gqa"]
  q, k, v = dense_inputs(1, batch, capacity, h, kh)
  mixed = jax.random.randint(jax.random.key(2), (batch,), 1, capacity + 1, jnp.int32)
  rows = []
  for fraction in (*FRACTIONS, "mixed"):
    lengths = mixed if fraction == "mixed" else jnp.full((batch,), int(fraction * capacity),
                                                         jnp.int32)
    want = highest(shared_kv_decode_ref)(q, k, v, lengths)
    row = dict(section="ragged", heads="gqa", batch=batch, context=capacity,
               length=float(jnp.mean(lengths)), fraction=fraction)
    rows += time_and_check(row, dense_impls(q, k, v, lengths), q, want,
                           decode_bytes(batch, float(jnp.mean(lengths)), h, kh), args)
  return rows


def bench_quant(preset: dict, args) -> list[dict]:
  """bf16, int8 and int4 caches of the same values: each kernel and XLA reference against the
  float32 reference on the values its cache holds."""
  batch, contexts = preset["quant"]
  h, kh = HEADS["gqa"]
  rows = []
  for context in contexts:
    q, k, v = dense_inputs(5, batch, context, h, kh)
    lengths = jnp.full((batch,), context, jnp.int32)
    row = {"section": "quant", "heads": "gqa", "batch": batch, "context": context,
           "length": context}
    want = highest(shared_kv_decode_ref)(q, k, v, lengths)
    base = time_and_check(dict(row, cache="bfloat16"), {"pallas": (shared_kv_decode,
                                                                    (k, v, lengths))},
                          q, want, decode_bytes(batch, context, h, kh), args)
    for mode in QUANT_MODES:
      storage = QuantStorage(mode, dtype=jnp.dtype(DTYPE).name)
      kb, vb = quantize(k, mode), quantize(v, mode)
      kq, vq = storage.kernel_operand(kb), storage.kernel_operand(vb)
      want = highest(shared_kv_decode_ref)(q, dequantize(kb, mode), dequantize(vb, mode),
                                           lengths)
      entry = kq.codes.shape[-1] * kq.codes.dtype.itemsize + 2 * kq.scales.shape[-1]
      base += time_and_check(dict(row, cache=mode),
                             {"pallas": (shared_kv_decode, (kq, vq, lengths)),
                              "xla": (shared_kv_decode_ref, (kq, vq, lengths))},
                             q, want, decode_bytes(batch, context, h, kh, entry), args)
    for r in base:
      r["speedup_vs_bf16"] = base[0]["seconds"] / r["seconds"]
    rows += base
    del q, k, v
  return rows


def sparse_inputs(batch: int, context: int, num_heads: int, num_kv_heads: int):
  """Each KV head owns `context` rows of a flat buffer; its table lists its blocks shuffled."""
  blocks = context // BLOCK
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (batch, num_heads, HEAD_DIM), DTYPE)
  k, v = (jax.random.normal(key, (batch, num_kv_heads * context, HEAD_DIM), DTYPE)
          for key in keys[1:3])
  order = jax.random.uniform(keys[3], (batch, num_kv_heads, blocks)).argsort(axis=-1)
  first = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None] * blocks
  return q, k, v, (order + first).astype(jnp.int32)


def bench_sparse(preset: dict, args) -> tuple[list[dict], dict]:
  batch, context = preset["sparse"]
  h, kh = HEADS["gqa"]
  q, k, v, tables = sparse_inputs(batch, context, h, kh)
  impls = lambda counts: {"pallas": (block_sparse_decode, (k, v, tables, counts)),
                          "xla": (functools.partial(block_sparse_decode_ref, block_size=BLOCK),
                                  (k, v, tables, counts))}
  rows = []
  for density in DENSITIES:
    counts = jnp.full((batch, kh), int(density * context), jnp.int32)
    want = highest(block_sparse_decode_ref)(q, k, v, tables, counts, block_size=BLOCK)
    row = dict(section="sparse", heads="gqa", batch=batch, context=context, density=density)
    rows += time_and_check(row, impls(counts), q, want,
                           decode_bytes(batch, density * context, h, kh), args)
  pallas = [r for r in rows if r["impl"] == "pallas"]
  per_density, fixed = np.polyfit([r["density"] for r in pallas], [r["seconds"] for r in pallas], 1)
  full = pallas[0]["seconds"]
  fit = dict(fixed_s=float(fixed), per_density_s=float(per_density),
             speedup_vs_density_1={r["density"]: full / r["seconds"] for r in pallas})
  print(f"sparse fit: t = {1e6 * fixed:.1f} us + density x {1e6 * per_density:.1f} us", flush=True)
  return rows, fit


def bench_big(preset: dict, args) -> list[dict]:
  """A K/V buffer over 4 GiB: checked on a few sequences against the reference."""
  batch, context = preset["big"]
  h, kh = HEADS["gqa"]
  q, k, v = dense_inputs(4, batch, context, h, kh)
  lengths = jnp.linspace(1, context, batch).astype(jnp.int32)
  out = jax.jit(shared_kv_decode)(q, k, v, lengths)
  errs = {b: max_error(out[b:b + 1], highest(shared_kv_decode_ref)(q[b:b + 1], k[b:b + 1],
                                                                   v[b:b + 1], lengths[b:b + 1]))
          for b in (0, batch // 2, batch - 1)}
  t = device_seconds(shared_kv_decode, (q, k, v, lengths), args.repeats, args.window_s)
  nbytes = decode_bytes(batch, float(jnp.mean(lengths)), h, kh)
  row = dict(section="big", impl="pallas", heads="gqa", batch=batch, context=context,
             buffer_gib=k.nbytes / 2**30, seconds=t, gb_per_s=nbytes / t / 1e9,
             max_abs_err=max(errs.values()), checked_sequences=list(errs), ok=max(errs.values())
             < TOLERANCE)
  print(row, flush=True)
  return [row]


SECTIONS = {"dense": bench_dense, "ragged": bench_ragged, "quant": bench_quant,
            "sparse": bench_sparse, "big": bench_big}


def plot(result: dict) -> None:
  import matplotlib  # noqa: PLC0415 (optional, only for the figure)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = result["rows"]
  fig, axes = plt.subplots(1, 4, figsize=(24, 4.8))
  ax = axes[0]
  for impl, style in (("pallas", "-"), ("xla", "--"), ("jax_decode_attention", ":")):
    for heads in HEADS:
      for batch in result["preset"]["batches"]:
        pts = [(r["context"], r["gb_per_s"]) for r in rows if r["section"] == "dense"
               and r["impl"] == impl and r["heads"] == heads and r["batch"] == batch]
        if pts:
          ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {heads} B={batch}")
  for key, color in (("copy_gb_per_s", "k"), ("read_gb_per_s", "grey")):
    ax.axhline(result["roofline"][key], color=color, lw=1, label=key.replace("_gb_per_s", ""))
  ax.set(xscale="log", xlabel="context (= valid length)", ylabel="GB/s of needed K/V",
         title="shared_kv_decode, bf16, D=128")
  ax.legend(fontsize=6)
  ax = axes[1]
  for impl in ("pallas", "xla", "jax_decode_attention"):
    pts = [(r["length"], 1e6 * r["seconds"]) for r in rows if r["section"] == "ragged"
           and r["impl"] == impl and r["fraction"] != "mixed"]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=impl)
  ax.set(xlabel=f"valid length (capacity {result['preset']['ragged'][1]})", ylabel="us per call",
         title="ragged: fixed capacity")
  ax.legend(fontsize=7)
  ax = axes[2]
  for impl in ("pallas", "xla"):
    pts = [(r["density"], 1e6 * r["seconds"]) for r in rows if r["section"] == "sparse"
           and r["impl"] == impl]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=impl)
  if "sparse_fit" in result:
    fit = result["sparse_fit"]
    ax.plot(DENSITIES, [1e6 * (fit["fixed_s"] + d * fit["per_density_s"]) for d in DENSITIES],
            "k:", label="fit: fixed + density x slope")
  ax.set(xscale="log", yscale="log", xlabel="density", ylabel="us per call",
         title="block_sparse_decode")
  ax.legend(fontsize=7)
  ax = axes[3]
  quant = [r for r in rows if r["section"] == "quant"]
  if quant:
    last = [r for r in quant if r["context"] == quant[-1]["context"]]
    ax.bar([f"{r['impl']}\n{r['cache']}" for r in last], [r["speedup_vs_bf16"] for r in last])
    ax.axhline(1, color="k", lw=1)
    ax.set(ylabel="bf16 kernel's time / this time", title=f"quantized caches, GQA, B="
           f"{last[0]['batch']}, context {last[0]['context']}")
  save_plot(fig, "kernels")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=("auto", *PRESETS), default="auto")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=tuple(SECTIONS),
                 help="sections to run (default: all; big only where the preset has it)")
  args = p.parse_args()
  name = args.preset if args.preset != "auto" else (
      "cpu" if jax.default_backend() == "cpu" else "gpu")
  preset = PRESETS[name]
  args.window_s = preset["window_s"]
  t0 = time.perf_counter()
  roof = roofline(preset["roofline_mib"], args.repeats, args.window_s)
  print(f"{jax.devices()[0].device_kind}: {roof}", flush=True)
  result = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax_version=jax.__version__, interpret=jax.default_backend() == "cpu",
                jax_decode_attention="timed on pre-transposed K/V" if jax_decode_attention
                else "not in this jax: skipped",
                preset=dict(name=name, **preset), head_dim=HEAD_DIM, dtype=jnp.dtype(DTYPE).name,
                block_size=BLOCK, sections=args.sections, roofline=roof, rows=[])
  sections = [SECTIONS[name] for name in args.sections if name != "big" or preset["big"]]
  for section in sections:  # the JSON is rewritten after each section: a cut run keeps its rows
    rows = section(preset, args)
    if section is bench_sparse:
      rows, result["sparse_fit"] = rows
    result["rows"] += rows
    result.update(all_outputs_ok=all(r["ok"] for r in result["rows"]),
                  wall_s=time.perf_counter() - t0)
    write_json("kernels", result)
  plot(result)

if __name__ == "__main__":
  main()
