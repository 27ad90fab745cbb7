"""kvjax against HF transformers on the same checkpoint file, side by side in one run.

  python -m benchmarks.peers [--batches 1 8] [--prompt-len 512] [--gen-len 64] [--repeats 3]
                             [--variant NAME [key=value ...]] ...

Both sides load the GGUF file `configs/smollm2_135m.yaml` names (transformers reads it with
`gguf_file=` and dequantizes it to float32; kvjax as the config's dtypes say, one process per
`--variant`, default: the config as it is). Each side runs in a process of its own, so its peak
memory is its own, and they take turns on the same prompts (Shakespeare, tokenized by the
checkpoint's tokenizer): a warm-up run each (kvjax compiles), then `--repeats` timed runs in
alternating order. Reported per batch: prefill and decode tokens/s (greedy, `model.generate`
for transformers, EOS off), kvjax / transformers ratios with 95% intervals over the paired
runs, whether the first `--check-steps` greedy tokens agree, peak resident memory during a
run, and for kvjax the bytes a decode step reads (weights + cache) per second next to the
machine's measured copy bandwidth. JSON and PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pickle
import platform
import subprocess
import sys
import time

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from benchmarks.peer_sides import CONFIG  # noqa: E402
from kvjax.data.corpus import shakespeare_plays  # noqa: E402
from kvjax.io import load_tokenizer, open_checkpoint  # noqa: E402

TRANSFORMERS = "transformers"


class Side:
  """A `benchmarks.peer_sides` process and its pipes."""

  def __init__(self, *args: str):
    self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peer_sides", *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self.versions = pickle.load(self.proc.stdout)

  def run(self, prompts_BxT: np.ndarray, gen_len: int) -> dict:
    pickle.dump((prompts_BxT, gen_len), self.proc.stdin)
    self.proc.stdin.flush()
    return pickle.load(self.proc.stdout)

  def close(self) -> None:
    pickle.dump(None, self.proc.stdin)
    self.proc.stdin.close()
    self.proc.wait()


# -------------------------------------------------------------------------------------------------
# The parent: prompts, turns, statistics, report.


def text_prompts(batch: int, prompt_len: int) -> np.ndarray:
  """`batch` windows of `prompt_len` tokens of Shakespeare, each from a different place."""
  tokenizer = load_tokenizer(kvjax.load_config(CONFIG).model)
  ids = np.concatenate([tokenizer.encode(play) for play in shakespeare_plays()[:batch]])
  starts = np.linspace(0, len(ids) - prompt_len, batch).astype(int)
  return np.stack([ids[s:s + prompt_len] for s in starts]).astype(np.int32)


def copy_bandwidth(nbytes: int = 1 << 29, threads: int = os.cpu_count() or 1) -> float:
  """Bytes read plus written per second by `threads` concurrent numpy copies (best of 5)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  bounds = np.linspace(0, src.size, threads + 1).astype(int)
  copy = lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])
  best = np.inf
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for _ in range(5):
      t0 = time.perf_counter()
      list(pool.map(copy, range(threads)))
      best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best


def interval(ratios: list[float]) -> list[float]:
  """Mean and 95% t-interval of paired ratios."""
  r = np.asarray(ratios)
  if len(r) < 2:
    return [float(r.mean())] * 3
  half = stats.t.ppf(0.975, len(r) - 1) * r.std(ddof=1) / np.sqrt(len(r))
  return [float(r.mean()), float(r.mean() - half), float(r.mean() + half)]


def agreement(tokens_BxN: np.ndarray, reference_BxN: np.ndarray) -> list[int]:
  """Per sequence, how many leading greedy tokens agree."""
  same = tokens_BxN == reference_BxN
  return [int(np.argmin(row)) if not row.all() else len(row) for row in same]


def summarize(runs: dict[str, list[dict]], batch: int, prompt_len: int, gen_len: int,
              check_steps: int) -> dict:
  """Per side: median tokens/s and peak memory; per kvjax side: ratios against transformers,
  greedy agreement, and decode bandwidth."""
  def rates(r):
    return batch * prompt_len / r["prefill_s"], batch * (gen_len - 1) / r["decode_s"]

  hf = runs[TRANSFORMERS]
  out = {}
  for name, side in runs.items():
    prefill, decode = zip(*(rates(r) for r in side))
    row = {"prefill_tokens_per_s": float(np.median(prefill)),
           "decode_tokens_per_s": float(np.median(decode)),
           "ms_per_step": float(np.median([1e3 * r["decode_s"] / (gen_len - 1) for r in side])),
           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in side),
           "all_prefill_tokens_per_s": list(prefill), "all_decode_tokens_per_s": list(decode)}
    if name != TRANSFORMERS:
      hf_prefill, hf_decode = zip(*(rates(r) for r in hf))
      steps_s = [r["decode_s"] / (gen_len - 1) for r in side]
      row.update(
          prefill_ratio=interval([a / b for a, b in zip(prefill, hf_prefill)]),
          decode_ratio=interval([a / b for a, b in zip(decode, hf_decode)]),
          greedy_agreement=agreement(side[-1]["tokens"][:, :check_steps],
                                     hf[-1]["tokens"][:, :check_steps]),
          param_bytes=side[-1]["param_bytes"], kv_cache_bytes=side[-1]["kv_cache_bytes"],
          # A decode step reads every weight and the whole dense cache.
          decode_read_bytes_per_s=float((side[-1]["param_bytes"] + side[-1]["kv_cache_bytes"])
                                        / np.median(steps_s)))
    out[name] = row
  return out


def plot(results: dict, names: list[str]) -> None:
  batches = list(results["by_batch"])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  width = 0.8 / len(names)
  for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"),
                            ("prefill", "decode")):
    for i, name in enumerate(names):
      values = [results["by_batch"][b][name][key] for b in batches]
      ax.bar(np.arange(len(batches)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(batches)) + width * (len(names) - 1) / 2,
                  [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{title} (prompt {results['prompt_len']}, +{results['gen_len']})")
  axes[0].legend(fontsize=8)
  save_plot(fig, "peers")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--prompt-len", type=int, default=512)
  p.add_argument("--gen-len", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--check-steps", type=int, default=16)
  p.add_argument("--variant", nargs="+", action="append", metavar="NAME [key=value]",
                 help="a kvjax run: a name and config overrides (repeat for several)")
  args = p.parse_args()
  variants = {v[0]: v[1:] for v in (args.variant or [["kvjax"]])}
  path = open_checkpoint(kvjax.load_config(CONFIG).model.weights).path
  sides = {TRANSFORMERS: Side(TRANSFORMERS, str(path)),
           **{name: Side("kvjax", *overrides) for name, overrides in variants.items()}}
  versions = {name: side.versions for name, side in sides.items()}
  names = list(sides)
  results = {"config": CONFIG, "variants": variants, "versions": versions,
             "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeats": args.repeats,
             "check_steps": args.check_steps, "cpu": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg(),
             "copy_bandwidth_bytes_per_s": copy_bandwidth(), "by_batch": {}}
  for batch in args.batches:
    prompts = text_prompts(batch, args.prompt_len)
    runs = {name: [] for name in names}
    for turn in range(args.repeats + 1):  # turn 0 warms up (and compiles)
      order = names if turn % 2 == 0 else names[::-1]
      for name in order:
        result = sides[name].run(prompts, args.gen_len)
        if turn:
          runs[name].append(result)
      print(f"batch {batch} turn {turn}: " + ", ".join(
          f"{n} {runs[n][-1]['prefill_s']:.2f}+{runs[n][-1]['decode_s']:.2f}s"
          for n in names if turn), flush=True)
    results["by_batch"][batch] = summarize(runs, batch, args.prompt_len, args.gen_len,
                                           args.check_steps)
    for name, row in results["by_batch"][batch].items():
      print(f"batch {batch} {name}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB"
            + (f", ratios prefill {row['prefill_ratio']}, decode {row['decode_ratio']}, greedy "
               f"agreement {row['greedy_agreement']}" if name != TRANSFORMERS else ""), flush=True)
  for side in sides.values():
    side.close()
  results["load_average_after"] = os.getloadavg()
  write_json("peers", results)
  plot(results, names)


if __name__ == "__main__":
  main()
