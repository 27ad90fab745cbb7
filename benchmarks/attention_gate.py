"""Attention-Gate vs eviction baselines at matched keep ratios (arXiv 2410.12876, kvjax spec).

Protocol, the same for every method: a held-out window of `prefix + cont` bytes; the prefix is
prefilled and evicted down to the method's keep ratio into the compacted per-(layer, K/V head)
cache, then the continuation is scored teacher-forced against that cache. Reported:
- held-out loss on the continuation (nats/byte);
- copy retrieval: a span of the prefix is repeated as the continuation; accuracy = fraction of
  the repeated bytes that are the argmax (needs the evicted cache to still hold the span);
- prefill and decode wall-clock and the KV bytes decode holds (`decode.throughput.measure`).
Methods: dense base; AG gates trained on the frozen base at target eviction 25/50/75%; each
baseline (StreamingLLM, local window, random, H2O, TOVA, SnapKV) at the ratio AG achieved; and
an equal-budget control (the base fine-tuned the same steps without eviction, dense).

  python -m benchmarks.attention_gate [--base runs/ag_base] [--workdir runs/ag] [--gate-steps 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kvjax
from benchmarks.common import save_plot, write_json
from kvjax.config import EvictionConfig
from kvjax.data.pipeline import make_data
from kvjax.decode.throughput import measure
from kvjax.eviction.policies import POLICIES
from kvjax.training import restore_params, train
from kvjax.training.metrics import METRICS_FILE

EVICTIONS = (0.25, 0.5, 0.75)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", default="runs/ag_base", help="the base run (trained if missing)")
  p.add_argument("--workdir", default="runs/ag", help="where the gate and control runs go")
  p.add_argument("--gate-steps", type=int, default=150, help="steps for gates and the control")
  p.add_argument("--prefix", type=int, default=192, help="evicted context (bytes)")
  p.add_argument("--cont", type=int, default=64, help="scored continuation (bytes)")
  p.add_argument("--span", type=int, default=32, help="copied span for retrieval (bytes)")
  p.add_argument("--windows", type=int, default=32, help="held-out windows per measurement")
  return p.parse_args(argv)


def trained(cfg_path: str, workdir: str, overrides: list[str]):
  cfg = kvjax.load_config(cfg_path, overrides)
  t0 = time.perf_counter()
  result = train(cfg, workdir)
  print(f"{workdir}: val loss {result.val_loss:.4f} ({time.perf_counter() - t0:.0f} s)")
  return cfg, restore_params(workdir, cfg)


def training_log(workdir: str) -> list[dict]:
  """The run's logged metrics (loss, LM loss, eviction per layer and K/V head, val loss)."""
  lines = (Path(workdir) / METRICS_FILE).read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


@jax.jit
def _continuation_scores(logits_BxTxV, targets_BxT):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return ce.mean(), (jnp.argmax(logits_BxTxV, -1) == targets_BxT)


@functools.partial(jax.jit, static_argnums=0)
def apply_cached(model, params, tokens_BxT, positions_BxT, cache):
  return model.apply({"params": params}, tokens_BxT, positions=positions_BxT, cache=cache)


def score(model, params, cache, tokens_BxT, prefix: int, first_logits_BxV):
  """Teacher-forced continuation after `prefix` tokens against `cache`: (loss, hits_BxC)."""
  b, t = tokens_BxT.shape
  pos = jnp.broadcast_to(jnp.arange(prefix, t - 1), (b, t - 1 - prefix))
  logits, _ = apply_cached(model, params, tokens_BxT[:, prefix:-1], pos, cache)
  logits = jnp.concatenate([first_logits_BxV[:, None], logits], axis=1)
  return _continuation_scores(logits, tokens_BxT[:, prefix:])


def evaluate(method: str, model, params, cfg, tokens_BxT, prefix: int, keep: float):
  """(loss, hits, achieved keep ratio per (layer, K/V head) `[L, K]`, KV bytes held) of one
  method on full windows: the prefix goes in through the method's cache (a baseline policy keeps
  `keep` of it), then the continuation is scored against what the cache holds."""
  b, t = tokens_BxT.shape
  if method in POLICIES:
    cfg = dataclasses.replace(cfg, eviction=EvictionConfig(policy=method, keep_ratio=keep))
    model = kvjax.build_model(cfg)
  cache, last_BxV, _ = kvjax.decode.prefill_cache(
      model, params, tokens_BxT[:, :prefix], np.full(b, prefix), kvjax.decode.init_cache(cfg, b, t))
  cache = cache.finish_prefill(t - prefix, jax.random.key(0))
  if method in ("dense", "control"):
    achieved = np.ones((cfg.num_kv_layers, cfg.num_kv_heads))
  else:
    achieved = np.stack([layer.kept_counts() for layer in cache.layers]).mean(axis=1) / prefix
  nbytes = cache.nbytes
  loss, hits = score(model, params, cache, tokens_BxT, prefix, last_BxV)
  return float(loss), np.asarray(hits), achieved, nbytes


def copy_windows(val_tokens: np.ndarray, prefix: int, span: int, rng) -> np.ndarray:
  """Windows whose continuation repeats a `span` of the prefix taken at a random depth."""
  out = []
  for row in val_tokens:
    start = rng.integers(8, prefix - span)
    out.append(np.concatenate([row[:prefix], row[start:start + span]]))
  return np.stack(out).astype(np.int32)


def main(argv=None) -> None:
  args = parse_args(argv)
  base_dir = args.base
  base_cfg, base_params = trained("configs/ag_base.yaml", base_dir, [])
  runs = {"dense": (base_cfg, base_params)}
  budget = [f"train.steps={args.gate_steps}", f"train.base={base_dir}"]
  runs["control"] = trained("configs/ag_base.yaml", f"{args.workdir}/control",
                            [*budget, "train.warmup_steps=10", "train.lr=1e-3",
                             f"train.eval_every={args.gate_steps}",
                             f"train.checkpoint_every={args.gate_steps}"])
  for e in EVICTIONS:
    runs[f"gate@{e}"] = trained("configs/ag_gate.yaml", f"{args.workdir}/gate_{e}",
                                [*budget, f"model.attention_gate.keep_ratio={1 - e}"])

  data = make_data(dataclasses.replace(base_cfg, train=dataclasses.replace(
      base_cfg.train, batch_size=args.windows, eval_batches=1)))
  window = args.prefix + args.cont
  val = data.val_batches[0][:, :window].astype(np.int32)
  copy = copy_windows(data.val_batches[0], args.prefix, args.span, np.random.default_rng(0))

  results = []

  def record(method, target, cfg, params, keep):
    model = kvjax.build_model(cfg.model)
    loss, _, achieved, nbytes = evaluate(method.split("@")[0], model, params, cfg.model,
                                         jnp.asarray(val), args.prefix, keep)
    _, hits, _, _ = evaluate(method.split("@")[0], model, params, cfg.model, jnp.asarray(copy),
                             args.prefix, keep)
    r = {"method": method, "target_eviction": target,
         "achieved_eviction": float(1 - achieved.mean()),
         "achieved_eviction_per_layer_head": (1 - achieved).round(4).tolist(),
         "heldout_loss": loss, "copy_accuracy": float(hits[:, 1:].mean()),
         "kv_bytes_after_prefill": nbytes}
    print(r)
    results.append(r)
    return r

  record("dense", 0.0, *runs["dense"], 1.0)
  record("control", 0.0, *runs["control"], 1.0)
  for e in EVICTIONS:
    gate = record(f"gate@{e}", e, *runs[f"gate@{e}"], 1.0)
    keep = 1 - gate["achieved_eviction"]
    for method in POLICIES:
      record(f"{method}@{e}", e, base_cfg, base_params, keep)

  timing = []
  for name in ("dense", *(f"gate@{e}" for e in EVICTIONS)):
    cfg, params = runs[name]
    t = measure(kvjax.build_model(cfg.model), params, cfg.model, batch=4,
                prompt_len=args.prefix, gen_len=args.cont)
    timing.append({"method": name, **{k: t[k] for k in (
        "prefill_s", "decode_s", "ms_per_step", "kv_cache_bytes", "device")}})
    print(timing[-1])

  logs = {name: training_log(f"{args.workdir}/{name.replace('@', '_')}")
          for name in ("control", *(f"gate@{e}" for e in EVICTIONS))}
  write_json("attention_gate", {
      "protocol": {"prefix": args.prefix, "continuation": args.cont, "copy_span": args.span,
                   "windows": args.windows, "gate_steps": args.gate_steps,
                   "base_config": "configs/ag_base.yaml", "gate_config": "configs/ag_gate.yaml"},
      "results": results, "timing": timing, "training": logs})
  plot(results)


def plot(results: list[dict]) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  names = ["gate", *POLICIES]
  for ax, key, label in ((axes[0], "heldout_loss", "held-out loss (nats/byte)"),
                         (axes[1], "copy_accuracy", "copy retrieval accuracy")):
    for name in names:
      pts = sorted((r["achieved_eviction"], r[key]) for r in results
                   if r["method"].split("@")[0] == name)
      ax.plot(*zip(*pts), marker="o", label="attention gate" if name == "gate" else name)
    for ref in ("dense", "control"):
      value = next(r[key] for r in results if r["method"] == ref)
      ax.axhline(value, ls="--" if ref == "dense" else ":", color="gray", label=ref)
    ax.set_xlabel("achieved eviction ratio")
    ax.set_ylabel(label)
  axes[0].legend(fontsize=7)
  save_plot(fig, "attention_gate")


if __name__ == "__main__":
  main()
