"""How much the jitted generate loop adds over a bare single-step forward.

  python -m benchmarks.decode_loop [--config configs/tiny.yaml] [--batch 32 --prompt-len 128 --gen-len 512]

Runs both on the same model and cache size in one process and reports tokens/s of the loop and
the ratio of its per-step time to the bare jitted step (goal: under 1.15).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from kvjax.decode.throughput import measure, time_bare_step  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default="configs/tiny.yaml")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--gen-len", type=int, default=512)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  n = args.prompt_len + args.gen_len
  cfg = kvjax.load_config(args.config, [f"model.max_seq_len={n}", *args.overrides])
  model = kvjax.build_model(cfg.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  loops, bares = [], []
  for _ in range(args.repeats):  # interleaved, so drift hits both alike
    loops.append(measure(model, params, cfg.model, batch=args.batch, prompt_len=args.prompt_len,
                         gen_len=args.gen_len))
    bares.append(time_bare_step(model, params, cfg.model, batch=args.batch,
                                prompt_len=args.prompt_len, steps=args.gen_len - 1))
  loop = min(loops, key=lambda r: r["ms_per_step"])
  bare_ms = 1e3 * min(bares)
  ratio = loop["ms_per_step"] / bare_ms
  result = {"config": args.config, "loop": loop, "bare_step_ms": bare_ms,
            "loop_over_bare": ratio, "repeats": args.repeats,
            "all_loop_ms": [r["ms_per_step"] for r in loops], "all_bare_ms": [1e3 * b for b in bares]}
  print(f"generate loop: {loop['decode_tokens_per_s']:,.0f} tok/s, {loop['ms_per_step']:.2f} ms/step; "
        f"bare step {bare_ms:.2f} ms; loop/bare = {ratio:.3f}")
  write_json("decode_loop", result)
  fig, ax = plt.subplots(figsize=(4, 3))
  ax.bar(["bare jitted step", "while_loop step"], [bare_ms, loop["ms_per_step"]], color=["gray", "C0"])
  ax.set_ylabel("ms per decode step")
  ax.set_title(f"batch {args.batch}, prompt {args.prompt_len}, +{args.gen_len} (x{ratio:.2f})")
  save_plot(fig, "decode_loop")


if __name__ == "__main__":
  main()
