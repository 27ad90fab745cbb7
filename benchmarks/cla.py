"""Cross-layer attention (arXiv 2405.12981) at ~5M parameters: validation loss vs KV bytes/token.

  python -m benchmarks.cla [--seeds 0 1] [--sweep-lrs 3e-3 1e-2] [--workdir runs/cla] [key=value ...]

Trains MQA, MQA-CLA2, MQA-CLA3 and half-head MQA (configs/*_5m.yaml) with kvjax's trainer on
byte-level Shakespeare: the same token budget, and per seed the same initialisation seed and
data order for every model. The learning rate is swept on seed 0 for the two families (MQA, CLA)
with a shorter budget (SWEEP), and each model uses its family's best, since the paper finds CLA
prefers a somewhat higher one.
Then, from the caches' real byte sizes, the largest batch whose cache fits a fixed budget, with
the decode throughput measured at that batch for MQA and MQA-CLA2.

Runs live in `--workdir/[sweep_]<model>_lr<lr>_seed<seed>`; a finished run is resumed, not
retrained.
Writes benchmarks/results/cla_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from kvjax.cli import UsageError, usage_errors  # noqa: E402
from kvjax.layers.cache import tree_nbytes  # noqa: E402
from kvjax.decode.throughput import measure  # noqa: E402
from kvjax.training import train  # noqa: E402

MODELS = {  # name: (config, the family whose swept learning rate it uses)
    "MQA": ("configs/mqa_5m.yaml", "MQA"),
    "MQA-CLA2": ("configs/mqa_cla2_5m.yaml", "MQA-CLA2"),
    "MQA-CLA3": ("configs/mqa_cla3_5m.yaml", "MQA-CLA2"),
    "MQA-halfhead": ("configs/mqa_halfhead_5m.yaml", "MQA"),
}


# The sweep's budget: 100 steps of 8 x 128 bytes, a quarter of the steps of the real runs.
SWEEP = ("train.steps=100", "train.batch_size=8", "train.warmup_steps=5", "train.eval_every=100",
         "train.checkpoint_every=100", "train.eval_batches=16")


def load(name: str, overrides=()):
  return kvjax.load_config(MODELS[name][0], list(overrides))


def cache_bytes(cfg, batch: int, max_len: int) -> int:
  """Bytes of the cache `init_cache` builds, read off its shapes without allocating it."""
  return tree_nbytes(jax.eval_shape(lambda: kvjax.decode.init_cache(cfg, batch, max_len)))


def largest_batch(cfg, budget_bytes: int, max_len: int) -> int:
  return budget_bytes // cache_bytes(cfg, 1, max_len)


def run(name: str, lr: float, seed: int, workdir: str, overrides, sweep: bool = False) -> dict:
  cfg = load(name, [*(SWEEP if sweep else ()), *overrides, f"train.lr={lr}", f"train.seed={seed}",
                    f"data.seed={seed}", "train.sample_tokens=0"])
  tag = f"{'sweep_' if sweep else ''}{name}_lr{lr:g}_seed{seed}"
  t0 = time.perf_counter()
  result = train(cfg, f"{workdir}/{tag}")
  seconds = time.perf_counter() - t0
  print(f"{tag}: val {result.val_loss:.4f} nats/byte ({seconds:.0f} s)")
  return {"model": name, "lr": lr, "seed": seed, "steps": cfg.train.steps,
          "batch_size": cfg.train.batch_size, "val_loss": result.val_loss,
          "tokens_per_s": result.tokens_per_s, "wall_s": seconds}


def summarize(runs: list[dict], lr_of: dict[str, float], overrides) -> dict:
  out = {}
  for name in MODELS:
    cfg = load(name, overrides).model
    losses = [r["val_loss"] for r in runs if r["model"] == name and r["lr"] == lr_of[name]]
    out[name] = {"config": MODELS[name][0], "lr": lr_of[name], "producer_of": cfg.producer_of,
                 "head_dim": cfg.head_dim_, "kv_bytes_per_token": cache_bytes(cfg, 1, 1),
                 "val_losses": losses, "val_loss_mean": float(np.mean(losses)),
                 "val_loss_min": min(losses), "val_loss_max": max(losses)}
  base = out["MQA"]["val_loss_mean"]
  for entry in out.values():  # per-byte perplexity ratio, as the paper compares perplexities
    entry["ppl_vs_mqa_pct"] = 100 * (math.exp(entry["val_loss_mean"] - base) - 1)
  return out


def plot(summary: dict, runs: list[dict]):
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for i, (name, s) in enumerate(summary.items()):
    x = s["kv_bytes_per_token"] * 2 ** (0.03 * (i - 1.5))  # models of equal bytes side by side
    ax.scatter([x] * len(s["val_losses"]), s["val_losses"], color=f"C{i}", alpha=0.4, s=18)
    ax.errorbar(x, s["val_loss_mean"], yerr=[[s["val_loss_mean"] - s["val_loss_min"]],
                                             [s["val_loss_max"] - s["val_loss_mean"]]],
                fmt="o", color=f"C{i}", capsize=4, label=f"{name} (lr {s['lr']:g})")
  seeds = sorted({r["seed"] for r in runs})
  ax.set_xscale("log", base=2)
  ticks = sorted({s["kv_bytes_per_token"] for s in summary.values()})
  ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("KV cache bytes per token (float32)")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title(f"~5M params, byte-level Shakespeare; mean and range over seeds {seeds}",
               fontsize=9)
  ax.legend(fontsize=8)
  return fig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--sweep-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
  p.add_argument("--workdir", default="runs/cla")
  p.add_argument("--cache-budget-mib", type=float, default=32.0,
                 help="fixed KV cache budget for the largest-batch comparison")
  p.add_argument("--context", type=int, default=256, help="tokens per sequence in that budget")
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="applied to every config, e.g. train.steps=4 for a smoke run")
  args = p.parse_args()
  with usage_errors():
    first = load("MQA", args.overrides)
    if not 4 <= args.context <= first.model.max_seq_len:
      raise UsageError(f"--context must be in 4..model.max_seq_len, got {args.context}")
    if args.cache_budget_mib <= 0:
      raise UsageError(f"--cache-budget-mib must be > 0, got {args.cache_budget_mib}")

  t0 = time.perf_counter()
  families = sorted({family for _, family in MODELS.values()})
  sweep = [run(family, lr, args.seeds[0], args.workdir, args.overrides, sweep=True)
           for family in families for lr in args.sweep_lrs]
  best = {family: min((r for r in sweep if r["model"] == family),
                      key=lambda r: r["val_loss"])["lr"] for family in families}
  lr_of = {name: best[family] for name, (_, family) in MODELS.items()}
  runs = [run(name, lr_of[name], seed, args.workdir, args.overrides)
          for seed in args.seeds for name in MODELS]
  train_s = time.perf_counter() - t0
  summary = summarize(runs, lr_of, args.overrides)

  budget = int(args.cache_budget_mib * 2**20)
  decode = {}
  for name in MODELS:
    cfg = load(name, args.overrides).model
    decode[name] = {"largest_batch": largest_batch(cfg, budget, args.context)}
  for name in ("MQA", "MQA-CLA2"):
    cfg = load(name, args.overrides)
    model = kvjax.build_model(cfg.model)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    decode[name]["throughput"] = measure(model, params, cfg.model,
                                         batch=decode[name]["largest_batch"],
                                         prompt_len=args.context // 4,
                                         gen_len=args.context - args.context // 4)

  payload = {
      "claim": "MQA-CLA2 at half the KV bytes loses little to MQA and beats half-head MQA "
               "at equal bytes (arXiv 2405.12981)",
      "budget": {"steps": first.train.steps, "batch_size": first.train.batch_size,
                 "seq_len": first.data.seq_len,
                 "tokens": first.train.steps * first.train.batch_size * first.data.seq_len,
                 "val_tokens": first.train.eval_batches * first.train.batch_size * first.data.seq_len},
      "overrides": args.overrides, "seeds": args.seeds, "sweep_lrs": args.sweep_lrs, "best_lr": best,
      "models": summary, "runs": runs, "sweep_runs": sweep, "sweep_overrides": SWEEP,
      "decode": {"cache_budget_bytes": budget, "context": args.context, **decode},
      "train_wall_s": train_s, "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }
  for name, s in summary.items():
    print(f"{name:13s} {s['kv_bytes_per_token']:5d} B/token  val {s['val_loss_mean']:.4f} "
          f"[{s['val_loss_min']:.4f}, {s['val_loss_max']:.4f}]  ppl vs MQA {s['ppl_vs_mqa_pct']:+.2f}%"
          f"  largest batch in {args.cache_budget_mib:g} MiB: {decode[name]['largest_batch']}")
  write_json("cla", payload)
  save_plot(plot(summary, runs), "cla")


if __name__ == "__main__":
  main()
