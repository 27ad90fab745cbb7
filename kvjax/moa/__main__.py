"""Build MoA plans for a kvjax model.

  python -m kvjax.moa plan --config configs/smollm2_135m.yaml --out plans/smollm2_50.json \\
      --density 0.5 --lengths 1024 2048 --samples 8 model.moa.block_size=32
  python -m kvjax.moa uniform --config configs/smollm2_135m.yaml --beta 0.5 --out plans/stream.json
  python -m kvjax.moa heads --config configs/smollm2_135m.yaml --lengths 1024 --out heads.json
  python -m kvjax.moa heads-plan --config configs/smollm2_135m.yaml --heads heads.json --top 20 \\
      --density 0.5 --lengths 1024 2048 --out plans/retrieval_50.json

`plan` profiles attention influence on calibration data the model answers itself (by default,
questions on fact notes planted early in a long context), searches one rule per head under the
density budget, validates the candidates and writes the best as the authors' JSON (plus
`<out>.report.json`). `uniform` writes one rule for every head (the StreamingLLM baseline: alpha
0, beta = density). `heads` measures, in dense attention, how much each head attends to a planted
answer while writing it (retrieval heads); `heads-plan` writes the hand-made plan that gives the
top heads' K/V heads full span and every other head one shorter window. Use a plan with
`model.moa.plan=PATH`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from kvjax.eval import synthetic
from kvjax.eval.long_context import answer_sequence
from kvjax.io import tokenizer_for
from kvjax.moa.heads import keep_heads_plan, planted_span, ranked, span_attention
from kvjax.moa.plan import uniform_plan

PLANTED = {"passkey": synthetic.passkey, "lines": synthetic.lines}

COMMANDS = ("plan", "uniform", "heads", "heads-plan")
CALIBRATIONS = ("facts", "reading", "summary")
MAX_GRID_POINTS = 10_000  # the search tries every rule on every head: more is a typo


def parse_args(argv):
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[0] if argv else None
  if command not in COMMANDS:
    ArgumentParser(prog="python -m kvjax.moa", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter).error(
        f"the first argument must be one of {', '.join(COMMANDS)}")
  prog = f"python -m kvjax.moa {command}"
  if command == "heads":
    heads = ArgumentParser(prog=prog, description="attention on a planted answer")
    heads.add_argument("--config", required=True)
    heads.add_argument("--checkpoint", help="training workdir (else model.weights)")
    heads.add_argument("--out", required=True, help="JSON to write")
    heads.add_argument("--task", choices=tuple(PLANTED), default="passkey")
    heads.add_argument("--lengths", type=int, nargs="+", default=[1024])
    heads.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    heads.add_argument("--samples", type=int, default=2, help="prompts per length and depth")
    heads.add_argument("--top", type=int, default=10, help="heads to print")
    heads.add_argument("--seed", type=int, default=0)
    add_config_args(heads)
    return argparse.Namespace(command=command, **vars(heads.parse_intermixed_args(argv[1:])))
  if command == "heads-plan":
    keep = ArgumentParser(prog=prog, description="full span for the top heads")
    keep.add_argument("--config", required=True)
    keep.add_argument("--heads", required=True, help="what `python -m kvjax.moa heads` wrote")
    keep.add_argument("--top", type=int, default=20, help="query heads whose K/V heads keep all")
    keep.add_argument("--density", type=float, default=0.5)
    keep.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                      help="final lengths at which the density must hold")
    keep.add_argument("--out", required=True)
    add_config_args(keep)
    return argparse.Namespace(command=command, **vars(keep.parse_intermixed_args(argv[1:])))
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
  plan.add_argument("--calibration", choices=CALIBRATIONS, default="facts",
                    help="facts: questions on a note of facts planted early among reading "
                         "passages; reading: questions on an early reading passage; summary: the "
                         "model summarises (or continues) a corpus passage")
  plan.add_argument("--work", help="directory that keeps each length's calibration data and "
                                   "profile, so that a rerun with the same arguments resumes")
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
  check_output("--work", args.work, directory=True)
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


def calibration_data(args, cfg, model, params, tokenizer, n: int, rng, short_answers: dict):
  """`(train, validation)` at length `n`, each `(tokens, weights)`: what `--calibration` names,
  with the dense model's own responses."""
  from kvjax.moa import calibration  # noqa: PLC0415

  sizes = {"train": args.samples, "validation": args.val_samples}
  if args.calibration == "summary":
    from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415
    docs = dict(zip(sizes, split_documents(load_documents(cfg.data.source),
                                            cfg.data.val_fraction)))
    return tuple(calibration.calibration_set(
        model, params, model.cfg, tokenizer, docs[part], length=n, count=count,
        response_tokens=args.response_tokens, rng=rng) for part, count in sizes.items())
  from kvjax.eval.reading import load_reading  # noqa: PLC0415
  passages = dict(zip(sizes, calibration.split_by_passage(load_reading())))
  out = []
  for part, count in sizes.items():
    facts = args.calibration == "facts"
    items = calibration.fact_items(rng, 64 * count) if facts else passages[part]
    tokens, weights, stats = calibration.reading_set(
        model, params, model.cfg, tokenizer, items, length=n, count=count,
        response_tokens=args.response_tokens, rng=rng, fillers=passages[part],
        check_short=not facts, short_answers=short_answers, log=tqdm.write)
    tqdm.write(f"length {n} {part}: {stats}")
    out.append((tokens, weights))
  return tuple(out)


def _saved(path: Path | None, make) -> dict:
  """The arrays at `path` if a run left them there, else `make()`'s, written atomically."""
  if path and path.exists():
    return dict(np.load(path))
  arrays = make()
  if path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
  return arrays


def profiled(args, cfg, model, params, tokenizer, n: int, short_answers: dict):
  """`(influence [L, H, M, M], validation)` at length `n`. With `--work`, the calibration data
  and the profile are kept there as soon as each exists, so a rerun resumes after either."""
  from kvjax.moa.pipeline import mean_influence  # noqa: PLC0415

  model_key = json.dumps([args.config, args.checkpoint,
                          sorted(o for o in args.overrides if not o.startswith("model.moa."))])
  key = (f"{args.calibration}_{n}_{args.samples}_{args.val_samples}_{args.response_tokens}_"
         f"{args.seed}_{hashlib.sha256(model_key.encode()).hexdigest()[:8]}")
  work = Path(args.work) if args.work else None

  def data():
    tqdm.write(f"length {n}: {args.samples} + {args.val_samples} {args.calibration} samples")
    rng = np.random.default_rng([args.seed, n])  # per length: a resumed length draws the same
    (tokens, weights), (val_tokens, val_weights) = calibration_data(
        args, cfg, model, params, tokenizer, n, rng, short_answers)
    return {"tokens": tokens, "weights": weights, "val_tokens": val_tokens,
            "val_weights": val_weights}

  samples = _saved(work and work / f"data_{key}.npz", data)
  block = model.cfg.moa.block_size
  profile = _saved(work and work / f"profile_{key}_b{block}.npz", lambda: {
      "influence": mean_influence(model, params, samples["tokens"], samples["weights"],
                                  block=block, progress=lambda it: tqdm(it, desc=f"profile {n}"))})
  return profile["influence"], (samples["val_tokens"], samples["val_weights"])


def run_plan(args, cfg) -> None:
  from kvjax.moa.pipeline import search_plan  # noqa: PLC0415

  start = time.perf_counter()
  model, params = kvjax.build_model(dense_config(cfg)), load_params(cfg, args.checkpoint)
  tokenizer = tokenizer_for(cfg)
  influence, validation, short_answers = {}, {}, {}
  for n in args.lengths:
    influence[n], validation[n] = profiled(args, cfg, model, params, tokenizer, n, short_answers)
  plan, records = search_plan(model, params, influence, validation, budget=args.density,
                              alphas=grid(*args.alphas), betas=grid(*args.betas),
                              max_rules=args.max_rules,
                              progress=lambda it: tqdm(it, desc="validate candidates"))
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plan.save(out)
  report = {"config": args.config, "overrides": args.overrides, "density": args.density,
            "lengths": args.lengths, "samples": args.samples, "val_samples": args.val_samples,
            "calibration": args.calibration,
            "seconds": time.perf_counter() - start,
            "candidates": [{**{k: v for k, v in r.items() if k != "plan"},
                            "chosen": r["plan"] == plan} for r in records]}
  Path(f"{out}.report.json").write_text(json.dumps(report, indent=2))
  best = min(records, key=lambda r: r["validation_loss"])
  print(f"wrote {out}: validation loss {best['validation_loss']:.4f}, density "
        + ", ".join(f"{n}: {d:.3f}" for n, d in best["density"].items())
        + f" ({len(records)} candidates, {report['seconds']:.0f} s)")


def dense_config(cfg):
  """The model config without a plan: profiling, responses and head measurements run dense."""
  return dataclasses.replace(cfg.model, moa=dataclasses.replace(cfg.model.moa, plan=""))


def run_heads(args, cfg) -> None:
  if args.samples < 1 or args.top < 1:
    raise UsageError(f"--samples and --top must be >= 1, got {args.samples} and {args.top}")
  if any(n < 64 or n > cfg.model.max_seq_len - 16 for n in args.lengths):
    raise UsageError(f"--lengths must be in [64, model.max_seq_len - 16 = "
                     f"{cfg.model.max_seq_len - 16}], got {args.lengths}")
  if not all(0.0 <= d <= 1.0 for d in args.depths):
    raise UsageError(f"--depths must be in [0, 1], got {args.depths}")
  if not (cfg.model.weights or args.checkpoint):
    raise UsageError("nothing to measure: set model.weights or give --checkpoint")
  start = time.perf_counter()
  model, params = kvjax.build_model(dense_config(cfg)), load_params(cfg, args.checkpoint)
  tokenizer = tokenizer_for(cfg)
  rng = np.random.default_rng(args.seed)
  samples = [PLANTED[args.task](tokenizer, rng, n, d)
             for n in args.lengths for d in args.depths for _ in range(args.samples)]
  mass_SxLxH = []
  for sample in tqdm(samples, desc="heads"):
    sequence, answer = answer_sequence(tokenizer, sample)
    keys_T, queries_T = planted_span(sequence, answer)
    mass_SxLxH.append(np.asarray(span_attention(model, params, sequence[None], keys_T[None],
                                                queries_T[None]))[:, 0])
  mass_LxH = np.mean(mass_SxLxH, axis=0)
  heads = ranked(mass_LxH)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({
      "config": args.config, "overrides": args.overrides, "task": args.task,
      "lengths": args.lengths, "depths": args.depths, "samples": args.samples, "seed": args.seed,
      "seconds": time.perf_counter() - start, "mass": mass_LxH.tolist(), "ranked": heads},
      indent=2))
  print(f"wrote {args.out}: attention on the planted answer, top {args.top}: "
        + ", ".join(f"L{h['layer']}H{h['head']} {h['mass']:.2f}" for h in heads[:args.top]))


def run_heads_plan(args, cfg) -> None:
  if not 0.0 < args.density <= 1.0:
    raise UsageError(f"--density must be in (0, 1], got {args.density}")
  if not Path(args.heads).is_file():
    raise UsageError(f"--heads {args.heads}: no such file (write it with "
                     f"`python -m kvjax.moa heads`)")
  mass_LxH = np.asarray(json.loads(Path(args.heads).read_text())["mass"])
  shape = (cfg.model.num_layers, cfg.model.num_heads)
  if mass_LxH.shape != shape:
    raise UsageError(f"--heads {args.heads} measures {mass_LxH.shape} (layers, heads), the model "
                     f"has {shape}")
  if not 1 <= args.top <= mass_LxH.size:
    raise UsageError(f"--top must be in [1, {mass_LxH.size}], got {args.top}")
  keep = [(h["layer"], h["head"]) for h in ranked(mass_LxH)[:args.top]]
  block = cfg.model.moa.block_size
  try:
    plan = keep_heads_plan(keep, num_layers=shape[0], num_heads=shape[1],
                           num_kv_heads=cfg.model.num_kv_heads, budget=args.density,
                           lengths=args.lengths, block=block)
  except ValueError as e:
    raise UsageError(f"{e} (--top, --density)") from None
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  plan.save(args.out)
  full = sum(b == 1.0 for row in plan.betas for b in row) // (shape[1] // cfg.model.num_kv_heads)
  rest = min(b for row in plan.betas for b in row)
  print(f"wrote {args.out}: {full} of {shape[0] * cfg.model.num_kv_heads} K/V heads full, the "
        f"rest beta {rest:g}; density " + ", ".join(
            f"{n}: {plan.kv_density(n, block, cfg.model.num_kv_heads):.3f}" for n in args.lengths))


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
    if args.command == "heads":
      run_heads(args, cfg)
      return
    if args.command == "heads-plan":
      run_heads_plan(args, cfg)
      return
    check_plan_args(args, cfg)
    run_plan(args, cfg)


if __name__ == "__main__":
  sys.exit(main())
