"""Quantized KV cache on SmolLM2-135M-Instruct: int8, fp8 and int4 entries against a bfloat16
cache, alone and under MoA 50% (a uniform StreamingLLM-style plan, 64 sinks) and H2O 50%.

  python -m benchmarks.kv_quant --resume                        # everything (hours on CPU)
  python -m benchmarks.kv_quant --resume --tasks perplexity     # one task at a time

Per method:
- perplexity: held-out 1,024-token windows (the config's validation split). The first half of
  each window is prefilled through the method's cache (its prompt logits score tokens 1..512),
  then the cache is finished (H2O evicts) and the second half is teacher-forced one decode step
  at a time, so every prediction of that half reads the method's compressed, quantized cache.
  Measured in this process; per-window losses are kept, and each ratio to the bfloat16 cache
  of the same selection has a 95% interval paired over windows.
- passkey: `python -m kvjax.eval --task passkey --scorer generate` at 1k and 2k tokens, 8 seeded
  samples at each of 5 depths (40 prompts per length, the same for every method); the answer is
  generated through the method's cache, since a forward pass would read unquantized K/V and a
  dense prefill; Wilson 95% intervals.
- decode: `decode.py`'s throughput test, for the KV bytes per token read off the cache after
  prefill and the method tag; the largest batch whose cache fits `--budget-mib` follows from
  the bytes per sequence of that request.
- speed: decode and prefill tokens/s of every method timed side by side in this process, the
  same request as decode.py, `--rounds` rounds with the methods in turn (so drift and a shared
  machine hit each alike); the median, and each method's ratio to the bfloat16 cache of its
  selection taken round by round.
A `+rot` mode (`int4@g8+rot`) quantizes after a Walsh-Hadamard rotation; its row also has the
perplexity ratio to the same mode unrotated, paired over the same windows.
`--resume` reuses every result already in benchmarks/results/kv_quant/ for the same command.
Results: benchmarks/results/<name>_<device>.json and .png (`--name`, default kv_quant):

  python -m benchmarks.kv_quant --resume --tasks perplexity --selections dense --name \
      kv_quant_rotation --modes none int4 int4@g32 int4@g16 int4@g8 int4+rot int4@g32+rot \
      int4@g16+rot int4@g8+rot                                  # rotation at every group size
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import kvjax
from benchmarks.common import RESULTS, run, save_plot, saved_record, wilson, write_json
from kvjax.data.corpus import load_documents, split_documents
from kvjax.decode import decode_step, init_cache, prefill_cache
from kvjax.decode.throughput import measure
from kvjax.io import load_weights, tokenizer_for

CONFIG = "configs/smollm2_135m.yaml"
ROOT = Path(__file__).resolve().parent.parent
TASKS = ("perplexity", "passkey", "decode", "speed")
WORK = RESULTS / "kv_quant"
SELECTIONS = ("dense", "moa50", "h2o50")


def mode_overrides(mode: str) -> list[str]:
  """`none` (a bfloat16 cache), `int8`, `fp8`, `int4`, `int4@g32` (32 values per scale), and
  any of those `+rot` (quantized after a Walsh-Hadamard rotation)."""
  if mode == "none":
    return ["model.cache_dtype=bfloat16"]
  mode, rotated = mode.removesuffix("+rot"), mode.endswith("+rot")
  name, _, group = mode.partition("@g")
  return ([f"model.kv_quant.mode={name}"]
          + ([f"model.kv_quant.group_size={group}"] if group else [])
          + (["model.kv_quant.rotate=true"] if rotated else []))


def methods(args) -> dict[str, list[str]]:
  """name (`selection/mode`) -> config overrides, for every selection and mode."""
  plan = WORK / "streaming_0.5.json"
  run([sys.executable, "-m", "kvjax.moa", "uniform", "--config", CONFIG, "--beta", "0.5",
       "--out", str(plan)])
  selection = {"dense": [], "moa50": [f"model.moa.plan={plan.relative_to(ROOT)}",
                                      "model.moa.sink_tokens=64"],
               "h2o50": ["model.eviction.policy=h2o", "model.eviction.keep_ratio=0.5"]}
  return {f"{s}/{m}": [*selection[s], *mode_overrides(m)]
          for s in args.selections for m in args.modes}


# ---------------------------------------------------------------------------------------------
# Perplexity through the cache.


def heldout_windows(cfg, tokenizer, count: int, width: int) -> np.ndarray:
  """`[count, width]`: consecutive windows of the validation split's tokens."""
  text = "\n".join(split_documents(load_documents(cfg.data.source), cfg.data.val_fraction)[1])
  ids = np.asarray(tokenizer.encode(text), np.int32)
  if len(ids) < count * width:
    raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {count} x {width}")
  return ids[:count * width].reshape(count, width)


@jax.jit
def _target_logprobs(logits_BxTxV, targets_BxT):
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _decoded_logprobs(model, params, cache, tokens_BxR, start):
  """`[B, R - 1]`: log-probability of tokens 1.. of `tokens_BxR` (positions start + 1 ..), each
  from one decode step through the cache."""
  def body(cache, x):
    tok_B, next_B, pos = x
    logits_BxV, cache = decode_step(model, params, tok_B, jnp.full_like(tok_B, pos), cache)
    return cache, _target_logprobs(logits_BxV[:, None], next_B[:, None])[:, 0]

  r = tokens_BxR.shape[1]
  _, logp_RxB = jax.lax.scan(body, cache, (tokens_BxR[:, :-1].T, tokens_BxR[:, 1:].T,
                                           start + jnp.arange(r - 1)))
  return logp_RxB.T


def window_losses(cfg, params, windows_WxT: np.ndarray, batch: int) -> dict:
  """Per window: summed loss of the prefilled half's predictions and of the decoded half's."""
  model = kvjax.build_model(cfg)
  w, t = windows_WxT.shape
  c = t // 2
  prefilled, decoded = [], []
  for i in range(0, w, batch):
    x_BxT = jnp.asarray(windows_WxT[i:i + batch])
    b = x_BxT.shape[0]
    cache, _, logits_BxCxV = prefill_cache(model, params, x_BxT[:, :c], np.full(b, c),
                                           init_cache(cfg, b, t), chunk=256, keep_logits=True)
    prefilled += list(-np.asarray(_target_logprobs(logits_BxCxV, x_BxT[:, 1:c + 1])).sum(1))
    del logits_BxCxV
    cache = cache.finish_prefill(t - c, jax.random.key(0))
    logp_BxR = _decoded_logprobs(model, params, cache, x_BxT[:, c:], c)
    decoded += list(-np.asarray(logp_BxR).sum(1))
  return {"prefilled_nll": [float(x) for x in prefilled], "prefilled_tokens": c,
          "decoded_nll": [float(x) for x in decoded], "decoded_tokens": t - c - 1}


def perplexities(args, names: dict[str, list[str]]) -> dict:
  """Window losses of every method, kept in the work folder (`--resume` reuses a method measured
  with the same overrides)."""
  base = kvjax.load_config(ROOT / CONFIG)
  params, tokenizer = load_weights(base.model), tokenizer_for(base)
  windows_WxT = heldout_windows(base, tokenizer, args.windows, args.window)
  path = WORK / f"perplexity_{args.windows}x{args.window}.json"
  out = json.loads(path.read_text()) if args.resume and path.exists() else {}
  for name, overrides in names.items():
    if out.get(name, {}).get("overrides") == overrides:
      continue
    start = time.perf_counter()
    cfg = kvjax.load_config(ROOT / CONFIG, overrides).model
    losses = window_losses(cfg, params, windows_WxT, args.ppl_batch)
    out[name] = {"overrides": overrides, **losses, "wall_s": round(time.perf_counter() - start)}
    print(f"perplexity {name}: {summarize_losses(out[name])}", flush=True)
    path.write_text(json.dumps(out, indent=2))
  return {name: out[name] for name in names if name in out}


def summarize_losses(rec: dict) -> dict:
  w = len(rec["decoded_nll"])
  per_token = lambda nll, n: float(np.sum(nll) / (w * n))
  whole = per_token(np.add(rec["prefilled_nll"], rec["decoded_nll"]),
                    rec["prefilled_tokens"] + rec["decoded_tokens"])
  decoded = per_token(rec["decoded_nll"], rec["decoded_tokens"])
  return {"perplexity": math.exp(whole), "decoded_perplexity": math.exp(decoded)}


def paired_ratio(nll_W, base_nll_W, tokens: int) -> dict:
  """The perplexity ratio to the base on the same windows (summed losses of `tokens` tokens
  each), with a 95% t interval over windows of the per-token loss difference."""
  diff_W = (np.asarray(nll_W) - np.asarray(base_nll_W)) / tokens
  half = stats.t.ppf(0.975, len(diff_W) - 1) * diff_W.std(ddof=1) / math.sqrt(len(diff_W))
  return {"ratio": math.exp(diff_W.mean()), "low": math.exp(diff_W.mean() - half),
          "high": math.exp(diff_W.mean() + half)}


# ---------------------------------------------------------------------------------------------
# Speed, side by side.


def speeds(args, names: dict[str, list[str]]) -> dict:
  """Per method: decode and prefill tokens/s of every round (`kvjax.decode.throughput.measure`:
  each call compiles once, then times a fresh prefill and decode loop), methods in turn."""
  base = kvjax.load_config(ROOT / CONFIG)
  params = load_weights(base.model)
  setups = {}
  for name, overrides in names.items():
    cfg = kvjax.load_config(ROOT / CONFIG, overrides).model
    setups[name] = (kvjax.build_model(cfg), cfg)
  rounds = {name: [] for name in names}
  for r in range(args.rounds):
    for name, (model, cfg) in setups.items():
      m = measure(model, params, cfg, batch=args.decode_batch, prompt_len=args.decode_prompt,
                  gen_len=args.decode_gen)
      rounds[name].append({k: m[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")})
      print(f"speed round {r} {name}: {m['decode_tokens_per_s']:.1f} decode tok/s", flush=True)
  return {"device": jax.devices()[0].device_kind, "rounds": rounds}


def speed_row(name: str, speed: dict) -> dict:
  """Medians over rounds, and the round-by-round ratio to `<selection>/none`."""
  rounds = speed["rounds"][name]
  base = speed["rounds"].get(f"{name.split('/')[0]}/none")
  row = {}
  for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
    row[key] = float(np.median([r[key] for r in rounds]))
    if base and base is not rounds:
      ratios = [r[key] / b[key] for r, b in zip(rounds, base)]
      row[key.replace("tokens_per_s", "speed_vs_none")] = {
          "median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
  return row


# ---------------------------------------------------------------------------------------------
# Passkey and decode, through the CLIs.


def commands(args) -> dict[str, list[str]]:
  return {
      "passkey": [sys.executable, "-m", "kvjax.eval", "--config", CONFIG, "--task", "passkey",
                  "--scorer", "generate", "--lengths", *map(str, args.passkey_lengths), "--depths",
                  *map(str, args.depths), "--samples", str(args.samples), "--batch",
                  str(args.passkey_batch)],
      "decode": [sys.executable, "decode.py", "--config", CONFIG, "--batch",
                 str(args.decode_batch), "--prompt-len", str(args.decode_prompt), "--gen-len",
                 str(args.decode_gen)],
  }


def cli_results(args, name: str, overrides: list[str]) -> dict:
  results = {}
  for task, cmd in commands(args).items():
    out = WORK / f"{name.replace('/', '_')}_{task}.json"
    if task in args.tasks:
      results[task] = run([*cmd, *overrides], out, args.resume)
    else:  # not run now; what an earlier pass measured still belongs in the summary
      results[task] = saved_record([*cmd, *overrides], out)
  return results


def summarize(args, cli: dict, ppl: dict | None, base_ppl: dict | None,
              speed: dict | None, unrotated_ppl: dict | None = None) -> dict:
  row = {"overrides": None}
  if ppl:
    row["overrides"] = ppl["overrides"]
    row.update(summarize_losses(ppl))
    whole = lambda rec: np.add(rec["prefilled_nll"], rec["decoded_nll"])
    tokens = ppl["prefilled_tokens"] + ppl["decoded_tokens"]
    if base_ppl and base_ppl is not ppl:
      row["perplexity_ratio"] = paired_ratio(whole(ppl), whole(base_ppl), tokens)
      row["decoded_perplexity_ratio"] = paired_ratio(ppl["decoded_nll"], base_ppl["decoded_nll"],
                                                     ppl["decoded_tokens"])
    if unrotated_ppl:  # the same codes without the rotation, on the same windows
      row["perplexity_ratio_to_unrotated"] = paired_ratio(whole(ppl), whole(unrotated_ppl),
                                                          tokens)
  if cli.get("passkey"):
    table = cli["passkey"]["result"]["result"]["by_length"]
    row["passkey"] = {}
    for length, cell in table.items():
      k = round(cell["accuracy"] * cell["n"])
      row["passkey"][length] = {"accuracy": cell["accuracy"], "n": cell["n"],
                                "interval": wilson(k, cell["n"])}
    row["passkey_command"] = cli["passkey"]["command"]
  if cli.get("decode"):
    r = cli["decode"]["result"]
    per_sequence = r["kv_cache_bytes"] / r["batch"]
    row.update({"method": r["method"], "kv_bytes_per_token": r["kv_bytes_per_token"],
                "kv_bytes_per_sequence": per_sequence,
                "largest_batch_in_budget": int(args.budget_mib * 2**20 // per_sequence),
                "decode_command": cli["decode"]["command"]})
  if speed:
    row.update(speed)
  return row


def plot(summary: dict, name: str) -> None:
  import matplotlib  # noqa: PLC0415 (only the plot needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = summary["methods"]
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  for selection in SELECTIONS:
    names = [n for n in rows if n.startswith(f"{selection}/")
             and "kv_bytes_per_token" in rows[n] and "decoded_perplexity" in rows[n]]
    if names:
      axes[0].plot([rows[n]["kv_bytes_per_token"] for n in names],
                   [rows[n]["decoded_perplexity"] for n in names], marker="o", label=selection)
      for n in names:
        axes[0].annotate(n.split("/")[1], (rows[n]["kv_bytes_per_token"],
                                           rows[n]["decoded_perplexity"]), fontsize=7)
  axes[0].set(xscale="log", xlabel="KV bytes per token", ylabel="perplexity (decoded half)",
              title="held-out perplexity through the cache")
  axes[0].legend(fontsize=8)
  with_passkey = [n for n in rows if "passkey" in rows[n]]
  lengths = sorted({length for n in with_passkey for length in rows[n]["passkey"]}, key=int)
  for j, length in enumerate(lengths):
    xs = np.arange(len(with_passkey)) + 0.4 * j
    acc = [rows[n]["passkey"][length]["accuracy"] for n in with_passkey]
    lo = [a - rows[n]["passkey"][length]["interval"][0] for a, n in zip(acc, with_passkey)]
    hi = [rows[n]["passkey"][length]["interval"][1] - a for a, n in zip(acc, with_passkey)]
    axes[1].bar(xs, acc, width=0.4, yerr=[lo, hi], capsize=2, label=f"{length} tokens")
  axes[1].set_xticks(np.arange(len(with_passkey)) + 0.2, with_passkey, rotation=60, fontsize=7)
  axes[1].set(ylim=(0, 1.05), ylabel="accuracy", title="passkey (95% Wilson intervals)")
  axes[1].legend(fontsize=8)
  with_decode = [n for n in rows if "decode_tokens_per_s" in rows[n]]
  axes[2].bar(range(len(with_decode)), [rows[n]["decode_tokens_per_s"] for n in with_decode])
  axes[2].set_xticks(range(len(with_decode)), with_decode, rotation=60, fontsize=7)
  axes[2].set(ylabel="decode tokens/s", title="decode throughput, timed side by side")
  save_plot(fig, name)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--modes", nargs="+", default=["none", "int8", "fp8", "int4"],
                 help="none (bfloat16 cache), int8, fp8, int4, int4@g32 (values per scale), "
                      "int4+rot (rotated before quantizing)")
  p.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
  p.add_argument("--windows", type=int, default=16, help="held-out windows for perplexity")
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--ppl-batch", type=int, default=8)
  p.add_argument("--passkey-lengths", type=int, nargs="+", default=[1000, 2000])
  p.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
  p.add_argument("--samples", type=int, default=8, help="passkey samples per length and depth")
  p.add_argument("--passkey-batch", type=int, default=8)
  p.add_argument("--decode-batch", type=int, default=8)
  p.add_argument("--decode-prompt", type=int, default=512)
  p.add_argument("--decode-gen", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3, help="side-by-side speed rounds")
  p.add_argument("--budget-mib", type=float, default=256.0,
                 help="cache budget for the largest batch of decode.py's request shape")
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
  p.add_argument("--name", default="kv_quant",
                 help="the summary's name: benchmarks/results/<name>_<device>.json and .png")
  p.add_argument("--resume", action="store_true",
                 help="reuse results already in the work folder for the same commands")
  args = p.parse_args()
  WORK.mkdir(parents=True, exist_ok=True)
  names = methods(args)
  ppl = perplexities(args, names) if "perplexity" in args.tasks else {}
  if not ppl and args.resume:
    path = WORK / f"perplexity_{args.windows}x{args.window}.json"
    ppl = json.loads(path.read_text()) if path.exists() else {}
  speed_path = WORK / f"speed_{args.decode_batch}x{args.decode_prompt}+{args.decode_gen}.json"
  if "speed" in args.tasks:
    speed_path.write_text(json.dumps(speeds(args, names), indent=2))
  speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
  summary = {"config": CONFIG, "args": vars(args), "methods": {},
             "speed_device": speed and speed["device"]}
  for name, overrides in names.items():
    cli = cli_results(args, name, overrides)
    base = ppl.get(f"{name.split('/')[0]}/none")
    unrotated = ppl.get(name.removesuffix("+rot")) if name.endswith("+rot") else None
    timed = speed and name in speed["rounds"]  # in the one side-by-side run, or not at all
    summary["methods"][name] = summarize(args, cli, ppl.get(name), base,
                                         timed and speed_row(name, speed), unrotated)
    write_json(args.name, summary)
  plot(summary, args.name)


if __name__ == "__main__":
  main()
