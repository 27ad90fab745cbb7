"""Attention-Gate against eviction baselines where eviction matters: a byte-level base trained on
Shakespeare mixed with associative recall documents (`benchmarks.recall_corpus`), gates with LoRA
trained on it at target eviction 25/50/75% (several seeds), an equal-budget control (the same
LoRA, the same steps, no eviction), every method under both protocols.

  python -m benchmarks.attention_gate --resume    # corpus, base, gates, control, evaluation

Windows are `PREFIX` bytes of context and a continuation of `WINDOW - PREFIX` bytes, held out:
- recall: documents whose pairs open the context and are asked again in the continuation
  (fillers from the plays' validation split); recall = the fraction of the values' digits
  predicted (argmax, teacher-forced) where a key is asked for the first time, so that only the
  context holds the value (chance: 1/9 for a first digit, 1/10 for a second);
- prose: consecutive windows of the plays' validation split.
The context goes in through the method's cache, then the continuation is scored teacher-forced
against what the cache holds (continuation tokens are appended, never evicted):
- in_context: eviction while the context goes in (the gate's flags; each baseline evicting in
  a cache of the final size, `model.eviction.protocol=in_context`);
- compaction: a dense prefill, then each (layer, K/V head) keeps round(keep x context) tokens
  (the gate as a scorer, `model.attention_gate.protocol=compaction`; the baselines' scores).
Baselines run on the control's parameters (the same fine-tuning budget as the gates), at the
keep ratio the gates reached in context. Intervals: 95% t over windows of each window's value
averaged over seeds; p: paired t-test over windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

import kvjax
from benchmarks import recall_corpus
from benchmarks.common import save_plot, write_json
from kvjax.config import EvictionConfig
from kvjax.data.corpus import shakespeare_plays, split_documents
from kvjax.decode.throughput import measure
from kvjax.training import restore_params, train
from kvjax.training.metrics import METRICS_FILE

EVICTIONS = (0.25, 0.5, 0.75)
IN_CONTEXT = ("streaming_llm", "local_window", "random", "h2o", "tova")
COMPACTION = (*IN_CONTEXT, "snapkv")
PROTOCOLS = ("in_context", "compaction")
PREFIX = recall_corpus.PREFIX
WINDOW = recall_corpus.WINDOW
VAL_FRACTION = 0.05


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/ag_recall", help="corpus, base, gates and control")
  p.add_argument("--base-steps", type=int, default=4000)
  p.add_argument("--gate-steps", type=int, default=300, help="steps for gates and the control")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--recent", type=int, default=16, help="the gates' recent_tokens window")
  p.add_argument("--recall-docs", type=int, default=40000, help="recall documents in training")
  p.add_argument("--windows", type=int, default=256, help="held-out windows of each kind")
  p.add_argument("--batch", type=int, default=64, help="windows per evaluation batch")
  p.add_argument("--resume", action="store_true", help="reuse evaluations in the workdir")
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Training.


def trained(cfg_path: str, workdir: Path, overrides: list[str]):
  cfg = kvjax.load_config(cfg_path, overrides)
  start = time.perf_counter()
  result = train(cfg, workdir)
  print(f"{workdir}: val loss {result.val_loss:.4f} ({time.perf_counter() - start:.0f} s)",
        flush=True)
  return cfg, restore_params(workdir, cfg)


def training_log(workdir: Path) -> list[dict]:
  lines = (workdir / METRICS_FILE).read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def runs(args) -> dict:
  """name -> (cfg, params): `base`, `control/<seed>`, `gate@<e>/<seed>`."""
  work = Path(args.workdir)
  corpus = work / "corpus"
  if not (corpus / "0_recall.txt").exists():
    recall_corpus.write_corpus(corpus, shakespeare_plays(), args.recall_docs, VAL_FRACTION)
  data = [f"data.source={corpus}", f"data.val_fraction={VAL_FRACTION}"]
  out = {"base": trained("configs/ag_base.yaml", work / "base",
                         [*data, f"train.steps={args.base_steps}", "train.log_every=100",
                          f"train.eval_every={args.base_steps}",
                          "train.checkpoint_every=500"])}
  tune = [*data, f"train.base={work / 'base'}", "train.freeze_base=true",
          f"train.lora_rank={args.lora_rank}", f"train.steps={args.gate_steps}",
          f"train.eval_every={args.gate_steps}", f"train.checkpoint_every={args.gate_steps}"]
  for seed in args.seeds:
    out[f"control/{seed}"] = trained("configs/ag_base.yaml", work / f"control_{seed}",
                                     [*tune, f"train.seed={seed}", "train.warmup_steps=10",
                                      "train.weight_decay=0.0", "train.log_every=10"])
    for e in EVICTIONS:
      out[f"gate@{e}/{seed}"] = trained(
          "configs/ag_gate.yaml", work / f"gate_{e}_{seed}",
          [*tune, f"train.seed={seed}", f"model.attention_gate.keep_ratio={1 - e}",
           f"model.attention_gate.recent_tokens={args.recent}"])
  return out


# ---------------------------------------------------------------------------------------------
# Evaluation.


def heldout(count: int) -> dict[str, np.ndarray]:
  """`[count, WINDOW]` byte ids of held-out recall documents and prose windows."""
  val = recall_corpus.prose(split_documents(shakespeare_plays(), VAL_FRACTION)[1])
  prose = np.frombuffer(val.encode("ascii"), np.uint8)[:count * WINDOW]
  if len(prose) < count * WINDOW:
    raise SystemExit(f"the plays' validation split holds {len(prose)} bytes, fewer than "
                     f"{count} windows of {WINDOW}")
  return {"recall": recall_corpus.recall_windows(count, val, seed=12345),
          "prose": prose.reshape(count, WINDOW).astype(np.int32)}


@functools.partial(jax.jit, static_argnums=0)
def _continuation(model, params, cache, tokens_BxT, first_logits_BxV):
  """Per window and continuation position: loss, and whether the argmax is the target."""
  b, t = tokens_BxT.shape
  pos = jnp.broadcast_to(jnp.arange(PREFIX, t - 1), (b, t - 1 - PREFIX))
  logits, _ = model.apply({"params": params}, tokens_BxT[:, PREFIX:-1], positions=pos,
                          cache=cache)
  logits = jnp.concatenate([first_logits_BxV[:, None], logits], axis=1).astype(jnp.float32)
  targets = tokens_BxT[:, PREFIX:]
  return (optax.softmax_cross_entropy_with_integer_labels(logits, targets),
          jnp.argmax(logits, -1) == targets)


def evaluate(cfg, params, tokens_WxT: np.ndarray, batch: int) -> dict:
  """Per window: continuation loss (nats/byte), recall (digits right), kept fraction of the
  context (mean over layers and K/V heads), and the KV bytes held after the context."""
  model = kvjax.build_model(cfg)
  digits = recall_corpus.value_offsets() - PREFIX
  loss, recall, kept, nbytes = [], [], [], 0
  for i in range(0, len(tokens_WxT), batch):
    x = jnp.asarray(tokens_WxT[i:i + batch])
    b = x.shape[0]
    cache, last_BxV, _ = kvjax.decode.prefill_cache(
        model, params, x[:, :PREFIX], np.full(b, PREFIX), kvjax.decode.init_cache(cfg, b, WINDOW))
    cache = cache.finish_prefill(WINDOW - PREFIX, jax.random.key(0))
    if hasattr(cache.layers[0], "kept_counts"):
      counts_LxBxK = np.stack([layer.kept_counts() for layer in cache.layers])
      kept += [float(x) for x in counts_LxBxK.mean(axis=(0, 2)) / PREFIX]
    else:
      kept += [1.0] * b
    nbytes += int(cache.nbytes)
    ce_BxC, hit_BxC = _continuation(model, params, cache, x, last_BxV)
    loss += [float(x) for x in np.asarray(ce_BxC).mean(axis=1)]
    first_BxA = recall_corpus.first_asks(tokens_WxT[i:i + batch])
    hit_BxA = np.asarray(hit_BxC)[:, digits]
    recall += [float(h[f].mean()) for h, f in zip(hit_BxA, first_BxA)]
  return {"loss": loss, "recall": recall, "kept": kept, "kv_bytes": nbytes / len(tokens_WxT)}


def method_cfg(cfg, method: str, protocol: str, keep: float):
  """The model config of a baseline policy, or of a gate under `protocol`, at `keep`."""
  if method == "gate":
    gate = dataclasses.replace(cfg.attention_gate, protocol=protocol,
                               **({"keep_ratio": keep} if protocol == "compaction" else {}))
    return dataclasses.replace(cfg, attention_gate=gate)
  if method in ("dense", "control"):
    return cfg
  return dataclasses.replace(cfg, eviction=EvictionConfig(method, keep, protocol))


def evaluations(args, trained_runs: dict, windows: dict) -> dict:
  """`name -> kind -> per-window results`, kept in the workdir as they come (`--resume`)."""
  path = Path(args.workdir) / f"evaluations_{args.windows}.json"
  done = json.loads(path.read_text()) if args.resume and path.exists() else {}

  def run(name, cfg, params):
    if name not in done:
      start = time.perf_counter()
      done[name] = {kind: evaluate(cfg, params, w, args.batch) for kind, w in windows.items()}
      r = done[name]["recall"]
      print(f"{name}: recall {np.mean(r['recall']):.3f} loss {np.mean(r['loss']):.4f} kept "
            f"{np.mean(r['kept']):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
      path.write_text(json.dumps(done))
    return done[name]

  run("dense", trained_runs["base"][0].model, trained_runs["base"][1])
  for seed in args.seeds:
    cfg, params = trained_runs[f"control/{seed}"]
    run(f"control/{seed}", cfg.model, params)
  for e in EVICTIONS:
    for seed in args.seeds:
      cfg, params = trained_runs[f"gate@{e}/{seed}"]
      run(f"gate/in_context@{e}/{seed}", cfg.model, params)
    keep = float(np.mean([done[f"gate/in_context@{e}/{s}"]["recall"]["kept"]
                          for s in args.seeds]))
    for seed in args.seeds:
      cfg, params = trained_runs[f"gate@{e}/{seed}"]
      run(f"gate/compaction@{e}/{seed}", method_cfg(cfg.model, "gate", "compaction", keep),
          params)
      cfg, params = trained_runs[f"control/{seed}"]
      for protocol, policies in zip(PROTOCOLS, (IN_CONTEXT, COMPACTION)):
        for policy in policies:
          run(f"{policy}/{protocol}@{e}/{seed}", method_cfg(cfg.model, policy, protocol, keep),
              params)
  return done


def copy_gain(cfg, params, prose_WxT: np.ndarray, span: int = 120) -> dict:
  """Loss (nats/byte) on a held-out passage and on the same passage repeated right after it: a
  model that can look a token up in its context (induction heads, what recall needs) predicts
  the repeat far better than the first reading."""
  x = jnp.asarray(np.concatenate([prose_WxT[:, :span]] * 2, axis=1))
  logits = kvjax.build_model(cfg).apply({"params": params}, x[:, :-1])
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))
  return {"first": float(ce[:, 16:span - 1].mean()), "repeat": float(ce[:, span + 15:].mean())}


# ---------------------------------------------------------------------------------------------
# Statistics.


def interval(values_W: np.ndarray) -> list[float]:
  half = stats.t.ppf(0.975, len(values_W) - 1) * values_W.std(ddof=1) / math.sqrt(len(values_W))
  return [float(values_W.mean() - half), float(values_W.mean() + half)]


def cell(done: dict, names: list[str]) -> dict:
  """A method's loss and recall (on the recall windows) and prose loss, each window averaged over
  the seeds' runs `names`."""
  per_window = lambda kind, key: np.mean([done[n][kind][key] for n in names], axis=0)
  loss, recall, prose = (per_window("recall", "loss"), per_window("recall", "recall"),
                         per_window("prose", "loss"))
  return {"loss": float(loss.mean()), "loss_ci95": interval(loss),
          "recall": float(recall.mean()), "recall_ci95": interval(recall),
          "prose_loss": float(prose.mean()), "prose_loss_ci95": interval(prose),
          "kept": float(per_window("recall", "kept").mean()),
          "kv_bytes": float(np.mean([done[n]["recall"]["kv_bytes"] for n in names])),
          "n": len(loss), "seeds": len(names),
          "per_seed": {"loss": [float(np.mean(done[n]["recall"]["loss"])) for n in names],
                       "recall": [float(np.mean(done[n]["recall"]["recall"])) for n in names]}}


def paired(done: dict, a: list[str], b: list[str]) -> dict:
  """Paired t-tests over the recall windows of `a` against `b` (seed-averaged per window)."""
  out = {}
  for key in ("loss", "recall"):
    x = np.mean([done[n]["recall"][key] for n in a], axis=0)
    y = np.mean([done[n]["recall"][key] for n in b], axis=0)
    out[f"{key}_difference"] = float((x - y).mean())
    out[f"{key}_p"] = float(stats.ttest_rel(x, y).pvalue) if np.any(x != y) else 1.0
  return out


def claim(done: dict, seeds: list[int], e: float, protocol: str) -> dict:
  names = lambda method: [f"{method}/{protocol}@{e}/{s}" for s in seeds]
  methods = {"gate": cell(done, names("gate"))}
  for policy in (IN_CONTEXT if protocol == "in_context" else COMPACTION):
    methods[policy] = cell(done, names(policy))
  methods["dense"] = cell(done, ["dense"])
  methods["control"] = cell(done, [f"control/{s}" for s in seeds])
  gate = methods["gate"]
  beats = lambda other: (gate["loss_ci95"][1] < methods[other]["loss_ci95"][0]
                         and gate["recall_ci95"][0] > methods[other]["recall_ci95"][1])
  return {"eviction": e, "protocol": protocol, "achieved_eviction": 1 - gate["kept"],
          "loss_on": f"the {WINDOW - PREFIX}-byte continuation of the held-out recall windows",
          "methods": methods,
          "gate_vs": {p: paired(done, names("gate"), names(p)) for p in ("streaming_llm", "h2o")},
          "holds": beats("streaming_llm") and beats("h2o")}


# ---------------------------------------------------------------------------------------------


def timing(trained_runs: dict, seed: int, keep: float) -> list[dict]:
  """Prefill and decode wall-clock and KV bytes at 50% eviction, methods in turn (3 rounds,
  the fastest kept), on the control's parameters for the baselines; the gate in context also
  without its recent window, which is what that window costs."""
  gate_cfg, gate_params = trained_runs[f"gate@0.5/{seed}"]
  ctrl_cfg, ctrl_params = trained_runs[f"control/{seed}"]
  setups = {"dense": (ctrl_cfg.model, ctrl_params)}
  for protocol in PROTOCOLS:
    setups[f"gate/{protocol}"] = (method_cfg(gate_cfg.model, "gate", protocol, keep), gate_params)
    for policy in ("streaming_llm", "h2o"):
      setups[f"{policy}/{protocol}"] = (method_cfg(ctrl_cfg.model, policy, protocol, keep),
                                        ctrl_params)
  gate = setups["gate/in_context"][0]
  setups["gate/in_context/recent_0"] = (
      dataclasses.replace(gate, attention_gate=dataclasses.replace(gate.attention_gate,
                                                                   recent_tokens=0)), gate_params)
  best = {}
  for _ in range(3):
    for name, (cfg, params) in setups.items():
      m = measure(kvjax.build_model(cfg), params, cfg, batch=8, prompt_len=PREFIX,
                  gen_len=WINDOW - PREFIX)
      if name not in best or m["decode_s"] < best[name]["decode_s"]:
        best[name] = m
  return [{"method": name, **{k: m[k] for k in ("prefill_s", "decode_s", "ms_per_step",
                                                 "kv_cache_bytes", "device")}}
          for name, m in best.items()]


def main(argv=None) -> None:
  args = parse_args(argv)
  trained_runs = runs(args)
  windows = heldout(args.windows)
  done = evaluations(args, trained_runs, windows)
  claims = {str(e): {p: claim(done, args.seeds, e, p) for p in PROTOCOLS} for e in EVICTIONS}
  for e, by_protocol in claims.items():
    for p, c in by_protocol.items():
      g = c["methods"]["gate"]
      print(f"eviction {e} {p}: gate recall {g['recall']:.3f} loss {g['loss']:.4f}; holds "
            f"{c['holds']}", flush=True)
  keep = claims["0.5"]["in_context"]["methods"]["gate"]["kept"]
  base_cfg, base_params = trained_runs["base"]
  work = Path(args.workdir)
  write_json("attention_gate", {
      "claim": claims["0.5"]["in_context"], "claims": claims,
      "protocol": {"prefix": PREFIX, "continuation": WINDOW - PREFIX, "windows": args.windows,
                   "seeds": args.seeds, "base_steps": args.base_steps,
                   "gate_steps": args.gate_steps, "lora_rank": args.lora_rank,
                   "recent_tokens": args.recent, "recall_docs": args.recall_docs,
                   "base_config": "configs/ag_base.yaml", "gate_config": "configs/ag_gate.yaml"},
      "base_copy_gain": copy_gain(base_cfg.model, base_params, windows["prose"][:64]),
      "timing": timing(trained_runs, args.seeds[0], keep),
      "training": {name: training_log(work / name.replace("@", "_").replace("/", "_"))
                   for name in trained_runs}})
  plot(claims)


def plot(claims: dict) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
  for row, protocol in enumerate(PROTOCOLS):
    for col, key in enumerate(("recall", "loss")):
      ax = axes[row, col]
      methods = claims["0.5"][protocol]["methods"]
      for name in methods:
        if name in ("dense", "control"):
          continue
        xs, ys, lo, hi = [], [], [], []
        for e in EVICTIONS:
          c = claims[str(e)][protocol]
          m = c["methods"][name]
          xs.append(c["achieved_eviction"])
          ys.append(m[key])
          lo.append(m[key] - m[f"{key}_ci95"][0])
          hi.append(m[f"{key}_ci95"][1] - m[key])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2,
                    label="attention gate" if name == "gate" else name,
                    lw=2.5 if name == "gate" else 1)
      for ref, style in (("dense", "--"), ("control", ":")):
        ax.axhline(methods[ref][key], ls=style, color="gray", label=ref)
      ax.set(title=f"{protocol}: {key} on held-out recall windows",
             xlabel="achieved eviction" if row else None)
  for ax in axes[:, 0]:
    ax.legend(fontsize=7)
  save_plot(fig, "attention_gate")


if __name__ == "__main__":
  main()
