"""Block Transformer vs vanilla decode throughput at equal non-embedding size (arXiv 2406.02657).

  python -m benchmarks.block_throughput [--cache-budget-mib M] [--length-scale S] [key=value ...]

The paper's two settings, prefill-heavy (2048 -> 128 tokens) and decode-heavy (128 -> 2048), each
at the largest batch whose KV cache (its real byte size, from the cache's shapes) fits a fixed
budget, side by side in one run with kvjax's throughput harness (`kvjax.decode.throughput`,
as decode.py reports it). Random weights: EOS is off, so every sequence decodes every token.

On a GPU the defaults are the paper's: the 85M pair (configs/block_85m.yaml, vanilla_85m.yaml).
On CPU they are scaled down so that a run takes minutes: the 5M pair (block_5m, vanilla_5m) and
prompt and generation lengths divided by 4. Writes benchmarks/results/block_throughput_<device>.json
and .png.
"""

from __future__ import annotations

import argparse

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.seeded_runs import cache_bytes, largest_batch  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from kvjax.cli import UsageError, usage_errors  # noqa: E402
from kvjax.decode.throughput import measure  # noqa: E402

SETTINGS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 2048)}  # prompt, generated
PAIRS = {  # backend kind: (vanilla config, block config, length divisor, cache budget in MiB)
    "cpu": ("configs/vanilla_5m.yaml", "configs/block_5m.yaml", 4, 64.0),
    "accelerator": ("configs/vanilla_85m.yaml", "configs/block_85m.yaml", 1, 40 * 1024.0),
}


def run_setting(models: dict, prompt_len: int, gen_len: int, budget: int) -> dict:
  """Both models at their largest batch in `budget` bytes of cache; block/vanilla ratios."""
  out = {}
  for name, (cfg, model, params) in models.items():
    batch = largest_batch(cfg.model, budget, prompt_len + gen_len)
    if batch < 1:
      raise UsageError(f"{name}: one sequence's cache ({cache_bytes(cfg.model, 1, prompt_len + gen_len):,} "
                       f"bytes) exceeds the budget of {budget:,} bytes; raise --cache-budget-mib")
    r = measure(model, params, cfg.model, batch=batch, prompt_len=prompt_len, gen_len=gen_len)
    r["kv_bytes_per_sample"] = r["kv_cache_bytes"] / batch
    print(f"  {name:8s} batch {batch:4d} | prefill {r['prefill_tokens_per_s']:10,.0f} tok/s | "
          f"decode {r['decode_tokens_per_s']:10,.0f} tok/s, {r['ms_per_step']:7.2f} ms/step | "
          f"KV {r['kv_bytes_per_sample'] / 2**20:7.2f} MiB/sample")
    out[name] = r
  keys = ("decode_tokens_per_s", "prefill_tokens_per_s", "ms_per_step", "kv_bytes_per_sample", "batch")
  out["block_over_vanilla"] = {k: out["block"][k] / out["vanilla"][k] for k in keys}
  print("  block / vanilla: " + ", ".join(f"{k} x{v:.2f}" for k, v in out["block_over_vanilla"].items()))
  return out


def plot(results: dict):
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  names = list(results)
  for ax, key, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                         (axes[1], "kv_bytes_per_sample", "KV cache MiB per sample")):
    for i, model in enumerate(("vanilla", "block")):
      values = [results[s][model][key] / (2**20 if key.startswith("kv") else 1) for s in names]
      ax.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=model)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel(label)
    ax.legend()
  fig.suptitle("Block Transformer vs vanilla, largest batch in a fixed KV cache budget")
  return fig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vanilla", help="vanilla config (default: by backend, see above)")
  p.add_argument("--block", help="block transformer config (default: by backend)")
  p.add_argument("--cache-budget-mib", type=float, help="KV cache budget (default: by backend)")
  p.add_argument("--length-scale", type=int, help="divide the paper's lengths by this")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both configs")
  args = p.parse_args()
  vanilla, block, scale, budget_mib = PAIRS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
  with usage_errors():
    scale = args.length_scale or scale
    budget_mib = args.cache_budget_mib or budget_mib
    if scale < 1 or budget_mib <= 0:
      raise UsageError("--length-scale must be >= 1 and --cache-budget-mib > 0")
    models = {}
    for name, path in (("vanilla", args.vanilla or vanilla), ("block", args.block or block)):
      cfg = kvjax.load_config(path, args.overrides)
      model = kvjax.build_model(cfg.model)
      params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
      models[name] = (cfg, model, params["params"])
    budget = int(budget_mib * 2**20)
    results = {}
    for setting, (prompt_len, gen_len) in SETTINGS.items():
      prompt_len, gen_len = prompt_len // scale, gen_len // scale
      print(f"{setting}: {prompt_len} -> {gen_len} tokens, KV cache budget {budget_mib:g} MiB")
      results[setting] = {"prompt_len": prompt_len, "gen_len": gen_len,
                          **run_setting(models, prompt_len, gen_len, budget)}
  write_json("block_throughput", {
      "configs": {name: args_path for name, args_path in
                  (("vanilla", args.vanilla or vanilla), ("block", args.block or block))},
      "overrides": args.overrides, "length_scale": scale, "cache_budget_bytes": budget,
      "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
      "settings": results})
  save_plot(plot({s: results[s] for s in SETTINGS}), "block_throughput")


if __name__ == "__main__":
  main()
