"""Block Transformer vs vanilla language-model loss at equal non-embedding size (arXiv 2406.02657).

  python -m benchmarks.block_quality [--seeds 0 1 2] [--workdir runs/block_quality] [--resume]
                                     [--report-only] [--lr-check] [key=value ...]

Trains configs/block_5m.yaml and configs/vanilla_5m.yaml (~5M non-embedding parameters each,
byte-level Shakespeare) with kvjax's trainer, 1,024,000 training bytes each
(`seeded_runs.BUDGET`), per seed the same data order; the learning rate of each family swept over
{1e-3, 3e-3, 1e-2} on a short run (`seeded_runs.SWEEP`, seed 0). The block model is trained and
scored with its own objective (`kvjax.models.block_transformer.loss`: 0..3 pad tokens before
every document, pad targets not scored). Reports on the tail of every play and on the World
English Bible: the loss ratio block / vanilla per seed (paired by data order) with its mean and
95% t-interval (paper: 1.19 at this size), and the loss by position within a block per seed
(paper: U-shaped for the block model).

For the loss-matched throughput ratio, vanilla models of 2 and 4 layers (same widths and
learning rate as the 6-layer one) are trained on the same budget (after the pair, and reported
once finished on every seed reported), and every model's decode
throughput is measured side by side at the largest batch whose cache fits a fixed budget
(block_throughput's decode-heavy setting at CPU scale). The vanilla throughput at the block
model's mean loss is interpolated along the vanilla ladder (log tokens/s linear in loss between
the two sizes whose losses bracket it); outside the ladder the fastest (or slowest) size bounds
the ratio.

`--lr-check` also trains every model at {3e-4, 1e-3, 3e-3, 1e-2} on the full budget and every
seed, and reports the ratio again at each model's best full-budget rate (chosen on the tail set).
`--resume` reads finished runs and continues unfinished ones (a set can span sittings);
`--report-only` writes the results of the seeds finished so far and trains nothing.
Writes benchmarks/results/block_quality_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks import seeded_runs  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from benchmarks.seeded_runs import (BUDGET, HELD_OUT, Run, Runner, describe,  # noqa: E402
                                    t_interval)
from kvjax.cli import UsageError, usage_errors  # noqa: E402

VANILLA, BLOCK = "configs/vanilla_5m.yaml", "configs/block_5m.yaml"
MODELS = {  # name: (config, its own overrides, the family whose swept learning rate it uses)
    "vanilla": (VANILLA, (), "vanilla"),
    "block": (BLOCK, (), "block"),
    "vanilla_2l": (VANILLA, ("model.num_layers=2",), "vanilla"),
    "vanilla_4l": (VANILLA, ("model.num_layers=4",), "vanilla"),
}
PAIR = ("vanilla", "block")
LADDER = ("vanilla_2l", "vanilla_4l", "vanilla")
PAPER_RATIO = 1.19


def vanilla_loss_by_position(model, params, tokens_BxT1, block_len: int):
  """Next-token loss grouped by the target's position modulo `block_len` (a flat reference)."""
  logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1])
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:])
  position_TxL = jax.nn.one_hot(jnp.arange(1, ce_BxT.shape[1] + 1) % block_len, block_len)
  return jnp.einsum("bt,tl->l", ce_BxT, position_TxL) / jnp.sum(position_TxL, 0) / ce_BxT.shape[0]


def by_position(block_len: int):
  """The `extra` measure of a vanilla run: its loss by position in the block model's blocks
  (the block model logs the same from its objective)."""

  def extra(cfg, params, batches) -> dict:
    fn = jax.jit(lambda p, t: vanilla_loss_by_position(kvjax.build_model(cfg.model), p, t,
                                                       block_len))
    return {"loss_by_block_position":
            np.mean([np.asarray(fn(params, jnp.asarray(b))) for b in batches], axis=0).tolist()}

  return extra


def model_run(name: str, lr: float, seed: int, overrides, sweep: bool = False) -> Run:
  config, own, _ = MODELS[name]
  budget = (*BUDGET, *seeded_runs.SWEEP) if sweep else BUDGET
  return Run(name, config, (*budget, *own, *overrides), lr, seed, sweep)


def matched_throughput(models: dict, decode: dict, held: str) -> dict:
  """The vanilla decode throughput at the block model's mean loss, along the vanilla ladder
  (the sizes reported).

  Between two sizes whose losses bracket the block model's, log tokens/s is interpolated
  linearly in loss. Outside the ladder a loss-matched vanilla model would be smaller (faster)
  than every size, or larger (slower): the fastest, or slowest, size then bounds the ratio.
  """
  ladder = sorted((models[n][held]["mean"], decode[n]["decode_tokens_per_s"], n)
                  for n in LADDER if n in models)
  target = models["block"][held]["mean"]
  block_tps = decode["block"]["decode_tokens_per_s"]
  bracket = [(a, b) for a, b in zip(ladder, ladder[1:]) if a[0] <= target <= b[0]]
  if bracket:
    (l0, t0, n0), (l1, t1, n1) = bracket[0]
    w = (target - l0) / (l1 - l0)
    tps = math.exp((1 - w) * math.log(t0) + w * math.log(t1))
    how = (f"log tokens/s interpolated in loss between {n0} ({l0:.4f}) and {n1} ({l1:.4f}) at "
           f"the block model's {target:.4f}")
  else:
    worse_than_all = target > ladder[-1][0]
    _, tps, name = (max if worse_than_all else min)(ladder, key=lambda e: e[1])
    how = (f"block loss {target:.4f} is {'above' if worse_than_all else 'below'} every vanilla "
           f"size's ({', '.join(f'{n} {l:.4f}' for l, _, n in ladder)}); against the "
           f"{'fastest' if worse_than_all else 'slowest'}, {name}, the ratio is an "
           f"{'upper' if worse_than_all else 'lower'} bound")
  return {"held_out": held, "block_loss": target, "vanilla_tokens_per_s": tps,
          "block_tokens_per_s": block_tps, "ratio": block_tps / tps, "how": how}


def summarize(runs: list[dict], lr_of: dict[str, float], seeds: list[int]) -> dict:
  """Per model finished on all `seeds` at its rate in `lr_of` and per held-out set: losses,
  mean and 95% interval, loss by position per seed; the block / vanilla loss ratio per seed
  (paired by data order)."""
  models = {}
  for name in MODELS:
    mine = sorted((r for r in runs if r["model"] == name and r["lr"] == lr_of[name]
                   and r["seed"] in seeds), key=lambda r: r["seed"])
    if len(mine) < len(seeds):
      continue
    models[name] = {"lr": lr_of[name], "seeds": seeds}
    for held in HELD_OUT:
      losses = [r["held_out"][held]["loss"] for r in mine]
      models[name][held] = {
          "losses": losses, **t_interval(losses),
          "loss_by_block_position": [r["held_out"][held]["loss_by_block_position"] for r in mine]}
  ratios = {held: [b / v for b, v in zip(models["block"][held]["losses"],
                                         models["vanilla"][held]["losses"])] for held in HELD_OUT}
  return {"models": models,
          "loss_ratio": {held: {"by_seed": r, **t_interval(r)} for held, r in ratios.items()}}


def plot(models: dict, block_len: int):
  fig, axes = plt.subplots(1, len(HELD_OUT), figsize=(11, 4))
  for ax, held in zip(axes, HELD_OUT):
    for i, name in enumerate(("vanilla", "block")):
      for j, curve in enumerate(models[name][held]["loss_by_block_position"]):
        ax.plot(range(block_len), curve, marker="o", color=f"C{i}", alpha=0.7,
                label=f"{name} (mean loss {models[name][held]['mean']:.3f})" if j == 0 else None)
    ax.set_xticks(range(block_len))
    ax.set_xlabel("target position within a block")
    ax.set_ylabel(f"held-out loss, {held} (nats/byte)")
    ax.legend()
  fig.suptitle("Loss by position within a block, 5M models, one line per seed")
  return fig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--workdir", default="runs/block_quality")
  p.add_argument("--resume", action="store_true", help="reuse finished runs, continue the others")
  p.add_argument("--report-only", action="store_true",
                 help="train nothing; report the seeds finished in --workdir")
  p.add_argument("--lr-check", action="store_true",
                 help="also train every model at every swept rate on the full budget and report "
                      "the comparison at each model's best full-budget rate")
  p.add_argument("--cache-budget-mib", type=float, default=64.0,
                 help="fixed KV cache budget for the throughput comparison")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--gen-len", type=int, default=512)
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="applied to every config after the budget (train.steps=4: a smoke run)")
  args = p.parse_args()
  with usage_errors():
    cfgs = {name: model_run(name, 1e-3, 0, args.overrides).cfg() for name in MODELS}
    if args.cache_budget_mib <= 0 or args.prompt_len < 1 or args.gen_len < 2:
      raise UsageError("--cache-budget-mib must be > 0, --prompt-len >= 1 and --gen-len >= 2")
    runner = Runner(args.workdir, args.resume, args.report_only)
    block_len = cfgs["block"].model.block.block_len
    t0 = time.perf_counter()
    families = {name: MODELS[name][0] for name in ("vanilla", "block")}
    sweep_runs, best = seeded_runs.sweep(families, args.seeds[0], args.overrides, runner)
    lr_of = {name: best[family] for name, (_, _, family) in MODELS.items()}
    make = lambda name, lr, seed: (model_run(name, lr, seed, args.overrides),
                                   None if name == "block" else by_position(block_len))
    runs, full_lr = seeded_runs.train_models(runner, make, lr_of, args.seeds, args.lr_check)
    train_s = time.perf_counter() - t0
    seeds = seeded_runs.complete_seeds(seeded_runs.at_lrs(runs, lr_of), PAIR)
    if not seeds:
      raise UsageError(f"no seed has finished for both {' and '.join(PAIR)} in {args.workdir}; "
                       f"train first")

  summary = summarize(runs, lr_of, seeds)
  full = full_lr and summarize(runs, full_lr, seeds)
  decode = seeded_runs.decode_at_budget({n: cfgs[n].model for n in MODELS},
                                        int(args.cache_budget_mib * 2**20), args.prompt_len,
                                        args.gen_len)
  tcfg, dcfg = cfgs["block"].train, cfgs["block"].data
  tokens = tcfg.steps * tcfg.batch_size * dcfg.seq_len
  for title, s in (("short-sweep rates", summary), ("best full-budget rates", full)):
    if not s:
      continue
    s["loss_matched_throughput"] = {held: matched_throughput(s["models"], decode, held)
                                    for held in HELD_OUT}
    print(f"-- at the {title}")
    for name, m in s["models"].items():
      print(f"{name:10s} lr {m['lr']:<6g} " + "  ".join(f"{held} {describe(m[held])}"
                                                       for held in HELD_OUT))
    for held in HELD_OUT:
      r, matched = s["loss_ratio"][held], s["loss_matched_throughput"][held]
      print(f"{held}: loss ratio block / vanilla {describe(r)} (paper at 5M: {PAPER_RATIO}); "
            f"loss-matched decode ratio x{matched['ratio']:.2f} ({matched['how']})")
  claim = lambda s: {"tokens_per_model": tokens, "seeds": len(seeds),
                     "lr": {n: s["models"][n]["lr"] for n in PAIR},
                     "loss_ratio": s["loss_ratio"]["tail"]["mean"],
                     "loss_ratio_ci95": s["loss_ratio"]["tail"]["ci95"],
                     "loss_by_position": s["models"]["block"]["tail"]["loss_by_block_position"]}
  write_json("block_quality", {
      "claim": claim(summary),
      **({"claim_full_budget_lr": claim(full), "full_budget_lr": {"best": full_lr, **full}}
         if full else {}),
      "paper_ratio": PAPER_RATIO,
      "held_out": HELD_OUT,
      "budget": {"overrides": BUDGET, "tokens": tokens,
                 "eval_tokens_per_set": tcfg.eval_batches * tcfg.batch_size * dcfg.seq_len},
      "overrides": args.overrides, "seeds": seeds, "sweep_lrs": seeded_runs.SWEEP_LRS,
      "sweep_overrides": seeded_runs.SWEEP, "best_lr": best, **summary,
      "decode": {"cache_budget_bytes": int(args.cache_budget_mib * 2**20),
                 "prompt_len": args.prompt_len, "gen_len": args.gen_len, **decode},
      "runs": runs, "sweep_runs": sweep_runs, "train_wall_s": train_s,
      "device": jax.devices()[0].device_kind, "jax_version": jax.__version__})
  save_plot(plot(summary["models"], block_len), "block_quality")

if __name__ == "__main__":
  main()
