"""Generate text from a kvjax model, or measure its decode throughput.

  python decode.py --config configs/tiny.yaml --checkpoint runs/tiny --prompt "ROMEO:"
  python decode.py --config configs/tiny.yaml --batch 32 --prompt-len 128 --gen-len 512 --json out.json
  python decode.py --config configs/a.yaml --config configs/b.yaml ...   # side by side, with ratios
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

import kvjax
from kvjax import sharding
from kvjax.cli import (ArgumentParser, UsageError, add_config_args, check_output, check_utf8,
                       load_params, seed, usage_errors)
from kvjax.data.tokenizers import encode_prompt
from kvjax.decode import SamplingConfig, generate
from kvjax.decode.throughput import measure, placed_cache
from kvjax.io import tokenizer_for

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")
COMPARED = ("decode_tokens_per_s", "prefill_tokens_per_s", "ms_per_step", "kv_cache_bytes",
            "kv_bytes_per_token")


def parse_args(argv):
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", action="append", help="YAML config; repeat to compare (default: configs/tiny.yaml)")
  p.add_argument("--checkpoint", action="append", help="training workdir (one, or one per --config)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--gen-len", type=int, default=128)
  p.add_argument("--prompt", help="generate text from this prompt instead of a throughput test")
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--seed", type=seed, default=0)
  p.add_argument("--json", help="write the results here as JSON")
  add_config_args(p)
  return p.parse_intermixed_args(argv)


def check_args(args, cfgs) -> None:
  for name in ("batch", "prompt_len", "gen_len"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.prompt is not None:
    check_utf8("--prompt", args.prompt)
  check_output("--json", args.json)
  if args.prompt is None and args.gen_len < 2:
    raise UsageError(f"--gen-len must be >= 2 for a throughput test, got {args.gen_len}")
  checkpoints = args.checkpoint or []
  if len(checkpoints) not in (0, 1, len(cfgs)) or (len(checkpoints) == 1 and len(cfgs) > 1):
    raise UsageError(f"give no --checkpoint, or one per --config ({len(cfgs)}), got {len(checkpoints)}")
  for path in checkpoints:
    if not Path(path).is_dir():
      raise UsageError(f"--checkpoint {path}: no such directory")
  if args.prompt is None:
    for path, cfg in zip(args.config, cfgs):
      need = args.prompt_len + args.gen_len
      if need > cfg.model.max_seq_len:
        raise UsageError(f"--prompt-len + --gen-len = {need} exceeds model.max_seq_len="
                         f"{cfg.model.max_seq_len} of {path}")
  try:
    SamplingConfig(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise UsageError(str(e)) from None


def placed_params(cfg, model, params):
  """The mesh `cfg.mesh` describes (one device: a 1x1x1 mesh, the same as no placement) and
  `params` placed on it by `kvjax.sharding`."""
  mesh = sharding.make_mesh(cfg.mesh)
  boxed = sharding.abstract_params(model, cfg.data.seq_len)
  return mesh, jax.device_put(nn.unbox(params), sharding.logical_shardings(boxed, mesh))


def generate_text(cfg, model, params, args) -> dict:
  tok = tokenizer_for(cfg)  # the checkpoint's own tokenizer when model.weights is set
  text, sep = args.prompt, ""
  if getattr(tok, "chat_template", None):  # chat models answer the prompt as a user turn
    text, sep = tok.apply_chat_template([{"role": "user", "content": args.prompt}]), "\n"
  try:
    ids = encode_prompt(tok, text)
  except ValueError as e:
    raise UsageError(f"--prompt: {e}") from None
  if len(ids) + args.gen_len > cfg.model.max_seq_len:
    raise UsageError(f"prompt ({len(ids)} tokens) + --gen-len {args.gen_len} exceeds "
                     f"model.max_seq_len={cfg.model.max_seq_len}")
  prompts = np.tile(ids[None], (args.batch, 1))
  mesh, params = placed_params(cfg, model, params)
  cache = placed_cache(cfg.model, args.batch, len(ids) + args.gen_len, mesh)
  out = generate(model, params, prompts, np.full(args.batch, len(ids)), max_new_tokens=args.gen_len,
                 rng=jax.random.key(args.seed), cache=cache,
                 sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                 eos_id=tok.eos_id, pad_id=tok.pad_id)
  texts = [tok.decode(out.tokens[b, : int(out.lengths[b])]) for b in range(args.batch)]
  for text in texts:
    print(f"--- {args.prompt}{sep}{text}")
  return {"prompt": args.prompt, "samples": texts}


def summary_line(name: str, r: dict) -> str:
  mesh = r["mesh"]
  per_device = "" if math.prod(mesh.values()) == 1 else (
      f", {r['kv_cache_bytes_per_device'] / 2**20:.2f} MiB per device on mesh "
      f"{'x'.join(str(n) for n in mesh.values())} (split over {r['cache_split']})")
  return (f"{name}: {r['method']} [{r['attention_impl']}] batch={r['batch']} "
          f"prompt={r['prompt_len']} gen={r['gen_len']} | prefill "
          f"{r['prefill_tokens_per_s']:,.0f} tok/s | decode {r['decode_tokens_per_s']:,.0f} tok/s, "
          f"{r['ms_per_step']:.2f} ms/step | KV cache {r['kv_cache_bytes'] / 2**20:.2f} MiB "
          f"({r['kv_bytes_per_token']:,.0f} B/token{per_device})")


def main(argv=None) -> None:
  args = parse_args(argv)
  with usage_errors():
    args.config = args.config or [DEFAULT_CONFIG]
    cfgs = [kvjax.load_config(path, args.overrides) for path in args.config]
    check_args(args, cfgs)
    checkpoints = args.checkpoint or [None] * len(cfgs)
    results = []
    for path, cfg, ckpt in zip(args.config, cfgs, checkpoints):
      model, params = kvjax.build_model(cfg.model), load_params(cfg, ckpt)
      if args.prompt is not None:
        results.append({"config": path, **generate_text(cfg, model, params, args)})
        continue
      mesh, params = placed_params(cfg, model, params)
      r = {"config": path, **measure(model, params, cfg.model, batch=args.batch,
                                     prompt_len=args.prompt_len, gen_len=args.gen_len,
                                     seed=args.seed, mesh=mesh)}
      print(summary_line(path, r))
      results.append(r)
  if args.prompt is None and len(results) > 1:
    base = results[0]
    for r in results[1:]:
      ratios = {k: r[k] / base[k] for k in COMPARED}
      r["ratios_vs_first"] = ratios
      print(f"{r['config']} / {base['config']}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))


if __name__ == "__main__":
  main()
