"""Scanned vs unrolled layers: compile time against depth, and what it costs per step.

  python -m benchmarks.scan_layers [--config configs/mqa_cla2_5m.yaml] [--depths 6 12 24]

Each depth is the config with `model.num_layers` changed (its CLA pattern kept), built twice:
unrolled and with `model.scan_layers=true`. Per build: seconds to compile the training gradient
and the decode loop's step, milliseconds per training step, and decode tokens/s from
`kvjax.decode.throughput.measure`. Both builds of a depth run back to back in one process, so
their ratios are comparable even on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import kvjax
from benchmarks.common import save_plot, write_json
from kvjax.decode import init_cache
from kvjax.decode.throughput import measure


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/mqa_cla2_5m.yaml")
  p.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--steps", type=int, default=5, help="timed training steps")
  return p.parse_args(argv)


def timed_compile(fn, *args) -> tuple[float, object]:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0, compiled


def one_build(cfg, args) -> dict:
  model = kvjax.build_model(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, 256)

  def grad(p, t):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": q}, t[:, :-1]), t[:, 1:]).mean()
    return jax.grad(loss)(p)

  def step(p, cache, t, pos):
    return model.apply({"params": p}, t, positions=pos, cache=cache)

  train_compile_s, train_step = timed_compile(grad, params, tokens)
  jax.block_until_ready(train_step(params, tokens))
  t0 = time.perf_counter()
  for _ in range(args.steps):
    jax.block_until_ready(train_step(params, tokens))
  train_ms = (time.perf_counter() - t0) / args.steps * 1e3
  one = jnp.zeros((args.batch, 1), jnp.int32)
  decode_compile_s, _ = timed_compile(step, params, init_cache(cfg, args.batch, args.seq_len),
                                      one, one)
  decode = measure(model, params, cfg, batch=args.batch, prompt_len=args.seq_len // 2,
                   gen_len=args.seq_len // 2)
  return {"train_compile_s": train_compile_s, "train_step_ms": train_ms,
          "decode_step_compile_s": decode_compile_s,
          "decode_tokens_per_s": decode["decode_tokens_per_s"],
          "kv_cache_bytes": decode["kv_cache_bytes"]}


def main(argv=None) -> None:
  args = parse_args(argv)
  rows = []
  for depth in args.depths:
    row = {"num_layers": depth}
    for scan in (False, True):
      cfg = kvjax.load_config(args.config, [f"model.num_layers={depth}",
                                            f"model.scan_layers={str(scan).lower()}"]).model
      row["scanned" if scan else "unrolled"] = one_build(cfg, args)
    row["train_compile_ratio"] = (row["scanned"]["train_compile_s"]
                                  / row["unrolled"]["train_compile_s"])
    row["decode_tokens_per_s_ratio"] = (row["scanned"]["decode_tokens_per_s"]
                                        / row["unrolled"]["decode_tokens_per_s"])
    print(row, flush=True)
    rows.append(row)
  write_json("scan_layers", {"config": args.config, "batch": args.batch,
                             "seq_len": args.seq_len, "rows": rows})
  plot(rows)


def plot(rows: list[dict]) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  depths = [r["num_layers"] for r in rows]
  for build in ("unrolled", "scanned"):
    axes[0].plot(depths, [r[build]["train_compile_s"] for r in rows], marker="o", label=build)
    axes[1].plot(depths, [r[build]["decode_tokens_per_s"] for r in rows], marker="o",
                 label=build)
  axes[0].set_ylabel("training-gradient compile time (s)")
  axes[1].set_ylabel("decode tokens/s")
  for ax in axes:
    ax.set_xlabel("layers")
    ax.legend()
  save_plot(fig, "scan_layers")


if __name__ == "__main__":
  main()
