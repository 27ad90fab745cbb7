"""Cross-layer attention (arXiv 2405.12981) at ~5M parameters: held-out loss vs KV bytes/token.

  python -m benchmarks.cla [--seeds 0 1 2] [--workdir runs/cla] [--resume] [--report-only]
                           [--lr-check] [key=value ...]

Trains MQA, MQA-CLA2, MQA-CLA3 and half-head MQA (configs/*_5m.yaml) with kvjax's trainer on
byte-level Shakespeare, 1,024,000 training bytes each (`seeded_runs.BUDGET`); per seed the same
initialisation seed and data order for every model. The learning rate is swept over
{1e-3, 3e-3, 1e-2} on a short run (`seeded_runs.SWEEP`, seed 0) for the two families, MQA
(MQA, half-head) and CLA (CLA2, CLA3), since the paper finds CLA prefers a higher one. Every model
is scored on the tail of every play and on the World English Bible; per model the mean and 95%
t-interval over seeds, and per paper ordering whether the intervals separate. Then, from the
caches' real byte sizes, the largest batch whose cache fits a fixed budget, and every model's
decode throughput at that batch, side by side in one process.

`--lr-check` also trains every model at {3e-4, 1e-3, 3e-3, 1e-2} on the full budget and every
seed, and reports the comparison again at each model's best full-budget rate (chosen on the
tail set): the check that the short sweep's choice holds for the whole budget.
`--resume` reads finished runs and continues unfinished ones (a set can span sittings);
`--report-only` writes the results of the seeds finished so far and trains nothing.
Writes benchmarks/results/cla_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks import seeded_runs  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from benchmarks.seeded_runs import (BUDGET, HELD_OUT, Run, Runner, describe,  # noqa: E402
                                    t_interval)
from kvjax.cli import UsageError, usage_errors  # noqa: E402

MODELS = {  # name: (config, the family whose swept learning rate it uses)
    "mqa": ("configs/mqa_5m.yaml", "mqa"),
    "mqa_cla2": ("configs/mqa_cla2_5m.yaml", "mqa_cla2"),
    "mqa_cla3": ("configs/mqa_cla3_5m.yaml", "mqa_cla2"),
    "mqa_halfhead": ("configs/mqa_halfhead_5m.yaml", "mqa"),
}
# The paper's orderings, lower loss first: CLA2 loses a little to its MQA parent at twice the
# bytes, beats half-head MQA at equal bytes, and CLA3 is on or behind CLA2's frontier.
ORDERINGS = (("mqa", "mqa_cla2"), ("mqa_cla2", "mqa_halfhead"), ("mqa_cla2", "mqa_cla3"))


def ordering(better: dict, worse: dict) -> str:
  """'holds' / 'reversed' when the two 95% intervals are disjoint, else 'undecided'."""
  if better["ci95"] is None or worse["ci95"] is None:
    return "undecided"
  if better["ci95"][1] < worse["ci95"][0]:
    return "holds"
  return "reversed" if worse["ci95"][1] < better["ci95"][0] else "undecided"


def summarize(runs: list[dict], lr_of: dict[str, float], seeds: list[int], overrides) -> dict:
  """Per model and held-out set: losses by seed, mean and 95% interval; the paper's orderings
  by interval and, since seeds share data order and initialisation, by paired differences."""
  models = {}
  for name, (config, _) in MODELS.items():
    cfg = kvjax.load_config(config, overrides).model
    mine = sorted((r for r in runs if r["model"] == name and r["lr"] == lr_of[name]
                   and r["seed"] in seeds),
                  key=lambda r: r["seed"])
    models[name] = {"config": config, "lr": lr_of[name], "producer_of": cfg.producer_of,
                    "head_dim": cfg.head_dim_,
                    "kv_bytes_per_token": seeded_runs.cache_bytes(cfg, 1, 1), "seeds": seeds}
    for held in HELD_OUT:
      losses = [r["held_out"][held]["loss"] for r in mine]
      models[name][held] = {"losses": losses, **t_interval(losses)}
  orderings = []
  for better, worse in ORDERINGS:
    for held in HELD_OUT:
      diffs = [w - b for b, w in zip(models[better][held]["losses"], models[worse][held]["losses"])]
      orderings.append({"paper": f"{better} < {worse}", "held_out": held,
                        "by_interval": ordering(models[better][held], models[worse][held]),
                        "paired_difference": t_interval(diffs) if diffs else None})
  return {"models": models, "orderings": orderings}


def plot(models: dict, seeds: list[int], full_budget: dict | None):
  """Filled: each model at the short sweep's rate; hollow: at its best full-budget rate."""
  fig, axes = plt.subplots(1, len(HELD_OUT), figsize=(11, 4))
  for ax, held in zip(axes, HELD_OUT):
    for i, (name, m) in enumerate(models.items()):
      x = m["kv_bytes_per_token"] * 2 ** (0.03 * (i - 1.5))  # models of equal bytes side by side
      for at, fill in ((m, True), (full_budget and full_budget[name], False)):
        if not at:
          continue
        s = at[held]
        color = f"C{i}" if fill else "none"
        ax.scatter([x] * len(s["losses"]), s["losses"], color=color, edgecolors=f"C{i}",
                   alpha=0.4, s=18)
        yerr = (None if s["ci95"] is None
                else [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]])
        ax.errorbar(x, s["mean"], yerr=yerr, fmt="o", color=f"C{i}", mfc=color, capsize=4,
                    label=f"{name} (lr {at['lr']:g}{'' if fill else ', full-budget best'})")
    ticks = sorted({m["kv_bytes_per_token"] for m in models.values()})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("KV cache bytes per token (float32)")
    ax.set_ylabel(f"held-out loss, {held} (nats/byte)")
    ax.legend(fontsize=8)
  fig.suptitle(f"~5M params, 1.02M training bytes of Shakespeare; mean and 95% interval over "
               f"seeds {seeds}", fontsize=9)
  return fig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--workdir", default="runs/cla")
  p.add_argument("--resume", action="store_true", help="reuse finished runs, continue the others")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing; report the seeds finished in --workdir")
  p.add_argument("--lr-check", action="store_true",
                 help="also train every model at every swept rate on the full budget and report "
                      "the comparison at each model's best full-budget rate")
  p.add_argument("--cache-budget-mib", type=float, default=32.0,
                 help="fixed KV cache budget for the largest-batch comparison")
  p.add_argument("--context", type=int, default=256, help="tokens per sequence in that budget")
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="applied to every config after the budget (train.steps=4: a smoke run)")
  args = p.parse_args()
  with usage_errors():
    first = Run("mqa", MODELS["mqa"][0], (*BUDGET, *args.overrides), 1e-3, 0).cfg()
    if not 4 <= args.context <= first.model.max_seq_len:
      raise UsageError(f"--context must be in 4..model.max_seq_len, got {args.context}")
    if args.cache_budget_mib <= 0:
      raise UsageError(f"--cache-budget-mib must be > 0, got {args.cache_budget_mib}")
    runner = Runner(args.workdir, args.resume, args.report_only)
    t0 = time.perf_counter()
    families = {family: MODELS[family][0] for _, family in MODELS.values()}
    sweep_runs, best = seeded_runs.sweep(families, args.seeds[0], args.overrides, runner)
    lr_of = {name: best[family] for name, (_, family) in MODELS.items()}
    make = lambda name, lr, seed: (Run(name, MODELS[name][0], (*BUDGET, *args.overrides), lr,
                                       seed), None)
    runs, full_lr = seeded_runs.train_models(runner, make, lr_of, args.seeds, args.lr_check)
    train_s = time.perf_counter() - t0
    seeds = seeded_runs.complete_seeds(seeded_runs.at_lrs(runs, lr_of), MODELS)
    if not seeds:
      raise UsageError(f"no seed has finished for every model in {args.workdir}; train first")

  summary = summarize(runs, lr_of, seeds, args.overrides)
  full = full_lr and summarize(runs, full_lr, seeds, args.overrides)
  budget = int(args.cache_budget_mib * 2**20)
  cfgs = {name: kvjax.load_config(config, args.overrides).model
          for name, (config, _) in MODELS.items()}
  decode = seeded_runs.decode_at_budget(cfgs, budget, args.context // 4,
                                        args.context - args.context // 4)
  tokens = first.train.steps * first.train.batch_size * first.data.seq_len
  for title, s in (("short-sweep rates", summary), ("best full-budget rates", full)):
    if not s:
      continue
    print(f"-- at the {title}")
    base = s["models"]["mqa"]["tail"]["mean"]
    for name, m in s["models"].items():  # per-byte perplexity ratio, as the paper compares
      m["ppl_vs_mqa_pct"] = 100 * (math.exp(m["tail"]["mean"] - base) - 1)
      m["largest_batch"] = decode[name]["batch"]
      m["decode_tokens_per_s"] = decode[name]["decode_tokens_per_s"]
      intervals = "  ".join(f"{held} {describe(m[held])}" for held in HELD_OUT)
      print(f"{name:13s} lr {m['lr']:<6g} {m['kv_bytes_per_token']:5d} B/token  {intervals}  "
            f"batch {m['largest_batch']} -> {m['decode_tokens_per_s']:,.0f} tok/s")
    for o in s["orderings"]:
      print(f"paper {o['paper']:26s} on {o['held_out']:9s}: {o['by_interval']}")
  claim = lambda s: {"tokens_per_model": tokens, "seeds": len(seeds), "models": {
      name: {"loss": m["tail"]["mean"], "ci95": m["tail"]["ci95"], "lr": m["lr"],
             "kv_bytes_per_token": m["kv_bytes_per_token"]} for name, m in s["models"].items()}}
  write_json("cla", {
      "claim": claim(summary),
      **({"claim_full_budget_lr": claim(full), "full_budget_lr": {"best": full_lr, **full}}
         if full else {}),
      "paper": "MQA-CLA2 at half the KV bytes loses little to MQA and beats half-head MQA at "
               "equal bytes (arXiv 2405.12981)",
      "held_out": HELD_OUT,
      "budget": {"overrides": BUDGET, "tokens": tokens,
                 "eval_tokens_per_set": first.train.eval_batches * first.train.batch_size
                 * first.data.seq_len},
      "overrides": args.overrides, "seeds": seeds, "sweep_lrs": seeded_runs.SWEEP_LRS,
      "sweep_overrides": seeded_runs.SWEEP, "best_lr": best, **summary,
      "runs": runs, "sweep_runs": sweep_runs,
      "decode": {"cache_budget_bytes": budget, "context": args.context, **decode},
      "train_wall_s": train_s, "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__})
  save_plot(plot(summary["models"], seeds, full and full["models"]), "cla")

if __name__ == "__main__":
  main()
