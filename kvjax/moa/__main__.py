"""Build MoA plans for a kvjax model.

  python -m kvjax.moa plan --config configs/smollm2_135m.yaml --out plans/smollm2_50.json \\
      --density 0.5 --lengths 512 1024 --samples 4
  python -m kvjax.moa uniform --config configs/smollm2_135m.yaml --beta 0.5 --out plans/stream.json

`plan` profiles attention influence on calibration data the model writes itself, searches one
rule per head under the density budget, validates the candidates and writes the best as the
authors' JSON (plus `<out>.report.json`). `uniform` writes one rule for every head (the
StreamingLLM baseline: alpha 0, beta = density). Use a plan with `model.moa.plan=PATH`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import kvjax
from kvjax.cli import (ArgumentParser, UsageError, add_config_args, check_output, load_params,
                       seed, usage_errors)
from kvjax.moa.plan import uniform_plan

COMMANDS = ("plan", "uniform")
MAX_GRID_POINTS = 10_000  # the search tries every rule on every head: more is a typo


def parse_args(argv):
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[0] if argv else None
  if command not in COMMANDS:
    ArgumentParser(prog="python -m kvjax.moa", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter).error(
        f"the first argument must be one of {', '.join(COMMANDS)}")
  prog = f"python -m kvjax.moa {command}"
  if command == "uniform":
    uni = ArgumentParser(prog=prog, description="one rule for every head")
    uni.add_argument("--config", required=True)
    uni.add_argument("--out", required=True)
    uni.add_argument("--alpha", type=float, default=0.0)
    uni.add_argument("--beta", type=float, default=0.5)
    add_config_args(uni)
    return argparse.Namespace(command=command, **vars(uni.parse_intermixed_args(argv[1:])))
  plan = ArgumentParser(prog=prog, description="profile, search and validate a plan")
  plan.add_argument("--config", required=True)
  plan.add_argument("--checkpoint", help="training workdir (else model.weights)")
  plan.add_argument("--out", required=True, help="plan JSON to write")
  plan.add_argument("--density", type=float, default=0.5, help="mean KV-cache density budget")
  plan.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
  plan.add_argument("--samples", type=int, default=4, help="calibration samples per length")
  plan.add_argument("--val-samples", type=int, default=2, help="validation samples per length")
  plan.add_argument("--response-tokens", type=int, default=64)
  plan.add_argument("--alphas", type=float, nargs=3, default=[-2048, 8192, 1024],
                    metavar=("FIRST", "LAST", "STEP"))
  plan.add_argument("--betas", type=float, nargs=3, default=[0, 1, 0.125],
                    metavar=("FIRST", "LAST", "STEP"))
  plan.add_argument("--max-rules", type=int, default=2, help="distinct rules per layer")
  plan.add_argument("--seed", type=seed, default=0)
  add_config_args(plan)
  return argparse.Namespace(command=command, **vars(plan.parse_intermixed_args(argv[1:])))


def grid(first: float, last: float, step: float) -> np.ndarray:
  if not all(map(math.isfinite, (first, last, step))) or step <= 0 or last < first:
    raise UsageError(f"a grid needs finite FIRST <= LAST and STEP > 0, got {first} {last} {step}")
  if (last - first) / step >= MAX_GRID_POINTS:
    raise UsageError(f"a grid may have at most {MAX_GRID_POINTS:,} points, got FIRST {first} LAST "
                     f"{last} STEP {step}")
  return np.arange(first, last + step / 2, step)


def check_plan_args(args, cfg) -> None:
  check_output("--out", args.out)
  if not 0.0 < args.density <= 1.0:
    raise UsageError(f"--density must be in (0, 1], got {args.density}")
  for name in ("samples", "val_samples", "response_tokens", "max_rules"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  block = cfg.model.moa.block_size
  for n in args.lengths:
    if n % block or n > cfg.model.max_seq_len or n <= args.response_tokens + block:
      raise UsageError(f"--lengths must be multiples of model.moa.block_size={block}, longer "
                       f"than --response-tokens + one block and <= model.max_seq_len="
                       f"{cfg.model.max_seq_len}, got {n}")
  from kvjax.moa import search  # noqa: PLC0415
  rules = search.rule_grid(grid(*args.alphas), grid(*args.betas), args.lengths)
  try:
    search.check_feasible(rules, args.lengths, num_layers=cfg.model.num_layers,
                          num_kv_heads=cfg.model.num_kv_heads, block=block,
                          sink=cfg.model.moa.sink_tokens, budget=args.density,
                          max_rules=args.max_rules)
  except search.InfeasibleBudget as e:
    raise UsageError(f"{e} (--alphas, --betas, --density, --max-rules)") from None
  if not (cfg.model.weights or args.checkpoint):
    raise UsageError("nothing to profile: set model.weights or give --checkpoint")
  if cfg.model.kind != "llama" or cfg.model.num_kv_layers < cfg.model.num_layers:
    raise UsageError("profiling needs a Llama model without cross-layer K/V sharing (its "
                     "influence is measured per layer); write a plan by hand or with `uniform`")


def run_plan(args, cfg) -> None:
  from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415
  from kvjax.io import tokenizer_for  # noqa: PLC0415
  from kvjax.moa.calibration import calibration_set  # noqa: PLC0415
  from kvjax.moa.pipeline import mean_influence, search_plan  # noqa: PLC0415

  start = time.perf_counter()
  # Profiling and responses run dense.
  mcfg = dataclasses.replace(cfg.model, moa=dataclasses.replace(cfg.model.moa, plan=""))
  model, params = kvjax.build_model(mcfg), load_params(cfg, args.checkpoint)
  tokenizer = tokenizer_for(cfg)
  train_docs, val_docs = split_documents(load_documents(cfg.data.source), cfg.data.val_fraction)
  rng = np.random.default_rng(args.seed)
  influence, validation = {}, {}
  for n in args.lengths:
    tqdm.write(f"length {n}: generating {args.samples} + {args.val_samples} responses")
    data = calibration_set(model, params, mcfg, tokenizer, train_docs, length=n,
                           count=args.samples, response_tokens=args.response_tokens, rng=rng)
    validation[n] = calibration_set(model, params, mcfg, tokenizer, val_docs, length=n,
                                    count=args.val_samples,
                                    response_tokens=args.response_tokens, rng=rng)
    influence[n] = mean_influence(model, params, *data, block=mcfg.moa.block_size,
                                  progress=lambda it, n=n: tqdm(it, desc=f"profile {n}"))
  plan, records = search_plan(model, params, influence, validation, budget=args.density,
                              alphas=grid(*args.alphas), betas=grid(*args.betas),
                              max_rules=args.max_rules,
                              progress=lambda it: tqdm(it, desc="validate candidates"))
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plan.save(out)
  report = {"config": args.config, "overrides": args.overrides, "density": args.density,
            "lengths": args.lengths, "samples": args.samples, "val_samples": args.val_samples,
            "seconds": time.perf_counter() - start,
            "candidates": [{**{k: v for k, v in r.items() if k != "plan"},
                            "chosen": r["plan"] == plan} for r in records]}
  Path(f"{out}.report.json").write_text(json.dumps(report, indent=2))
  best = min(records, key=lambda r: r["validation_loss"])
  print(f"wrote {out}: validation loss {best['validation_loss']:.4f}, density "
        + ", ".join(f"{n}: {d:.3f}" for n, d in best["density"].items())
        + f" ({len(records)} candidates, {report['seconds']:.0f} s)")


def main(argv=None) -> None:
  args = parse_args(argv)
  with usage_errors():
    cfg = kvjax.load_config(args.config, args.overrides)
    if args.command == "uniform":
      check_output("--out", args.out)
      plan = uniform_plan(cfg.model.num_layers, cfg.model.num_heads, args.alpha, args.beta)
      from kvjax.moa.plan import from_dict  # noqa: PLC0415
      from_dict(json.loads(plan.to_json()), "uniform plan")  # same range checks as a file
      Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      plan.save(args.out)
      print(f"wrote {args.out}")
      return
    check_plan_args(args, cfg)
    run_plan(args, cfg)


if __name__ == "__main__":
  sys.exit(main())
