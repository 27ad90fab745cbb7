"""MoA's claim on SmolLM2-135M-Instruct: at 50% KV density, per-head elastic windows keep passkey
retrieval at >= 0.9 x dense and above StreamingLLM with 4 sinks (McNemar p < 0.05); the same
comparison at 25%.

  python -m benchmarks.moa --resume --jobs 2                 # everything (hours on 2 CPU cores)
  python -m benchmarks.moa --resume --methods dense h2o      # a part; the summary keeps the rest

Every number comes from the project's CLIs, run as subprocesses and recorded with their commands
under benchmarks/results/moa/ (`--resume` reuses a command already run with the same arguments):
1. retrieval heads: `python -m kvjax.moa heads` (dense attention on a planted pass key);
2. plans per density: `heads-plan` (hand-made: the top heads' K/V heads keep every token, the
   rest one window), `plan` (profiled on long-range questions at 1,024 and 2,048 tokens, searched
   under the density at each length), `uniform` (StreamingLLM);
3. passkey per method and length: `python -m kvjax.eval --task passkey`, the same seeded prompts
   for every method (depths 0.1-0.9), teacher-forced through the forward pass (the method's
   whole-sequence attention), or generated where the forward pass cannot stand for the cache
   (H2O evicts after a dense prefill);
4. summary: accuracy with Wilson 95% intervals, exact McNemar p-values on the paired prompts;
5. `--top-sweep K ...`: hand-made plans keeping the top K heads at the first density, passkey at
   the first length (the mechanism's dose-response; `--methods` with no names runs only this and
   the summary).
Results: benchmarks/results/moa_<device>.json ("claim" at 50%, "claims" at every density) and
.png (accuracy by depth).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
from pathlib import Path

import numpy as np
from scipy import stats

import kvjax
from benchmarks.common import RESULTS, ROOT, run, save_plot, saved_record, wilson, write_json
from kvjax.moa.plan import load_plan

CONFIG = "configs/smollm2_135m.yaml"
KV_HEADS = kvjax.load_config(ROOT / CONFIG).model.num_kv_heads
WORK = RESULTS / "moa"
BASELINES = ("streaming_llm_4", "streaming_llm_64", "h2o")
METHODS = ("dense", "moa", "moa_handmade", *BASELINES)
COMPARED = {"moa": ("dense", "moa_handmade", *BASELINES),
            "moa_handmade": ("dense", *BASELINES)}


def rel(path: Path) -> str:
  return str(path.relative_to(ROOT))


def moa_cli(command: str, *args: str) -> list[str]:
  return [sys.executable, "-m", "kvjax.moa", command, "--config", CONFIG, *args]


def retrieval_heads(args) -> dict:
  out = WORK / "heads.json"
  return run(moa_cli("heads", "--lengths", *map(str, args.heads_lengths), "--depths",
                     *map(str, args.depths), "--samples", str(args.heads_samples),
                     "--seed", str(args.heads_seed), "--top", str(args.top), "--out", rel(out)),
             out, args.resume)


def plan_stem(name: str, args) -> str:
  """A plan file's stem (before `_<density>.json`): the hand-made plan is named by its head
  count, as the sweep's are."""
  return f"moa_handmade_top{args.top}" if name == "moa_handmade" else name


def small_blocks(args) -> list[str]:
  return [f"model.moa.block_size={args.block}", f"model.moa.sink_tokens={args.sink}"]


def plans(args, d: float, wanted: set[str]) -> dict[str, dict]:
  """Builds the plans the wanted methods at density `d` need: name -> record."""
  records = {}
  lengths = [str(n) for n in args.lengths]
  if "moa_handmade" in wanted:
    out = WORK / f"{plan_stem('moa_handmade', args)}_{d:g}.json"
    records["moa_handmade"] = run(moa_cli(
        "heads-plan", "--heads", rel(WORK / "heads.json"), "--top", str(args.top), "--density",
        str(d), "--lengths", *lengths, "--out", rel(out), *small_blocks(args)), out, args.resume)
  if "moa" in wanted:
    out = WORK / f"moa_{d:g}.json"
    records["moa"] = run(moa_cli(
        "plan", "--out", rel(out), "--density", str(d), "--lengths",
        *map(str, args.profile_lengths), "--samples",
        str(args.profile_samples), "--val-samples", str(args.val_samples), "--response-tokens",
        str(args.response_tokens), "--alphas", *map(str, args.alphas), "--betas",
        *map(str, args.betas), "--calibration", args.calibration, "--work",
        rel(WORK / "calibration"), *small_blocks(args)),
        Path(f"{out}.report.json"), args.resume)
  if wanted & {"streaming_llm_4", "streaming_llm_64"}:
    out = WORK / f"streaming_{d:g}.json"
    records["streaming"] = run(moa_cli("uniform", "--beta", str(d), "--out", rel(out)), out,
                               args.resume)
  return records


def overrides(name: str, d: float, args) -> list[str]:
  plan = lambda stem: f"model.moa.plan={rel(WORK / f'{stem}_{d:g}.json')}"
  if name.startswith("moa"):  # searched, hand-made and the sweep's plans
    return [plan(plan_stem(name, args)), *small_blocks(args)]
  return {"dense": [],
          "streaming_llm_4": [plan("streaming"), f"model.moa.block_size={args.block}",
                              "model.moa.sink_tokens=4"],
          "streaming_llm_64": [plan("streaming"), "model.moa.block_size=64",
                               "model.moa.sink_tokens=64"],
          "h2o": ["model.eviction.policy=h2o", f"model.eviction.keep_ratio={d:g}"]}[name]


def passkey_job(args, name: str, d: float, n: int, scorer: str) -> tuple[list[str], Path]:
  tag = "dense" if name == "dense" else f"{plan_stem(name, args)}_{d:g}"
  out = WORK / f"passkey_{tag}_{n}_{scorer}.json"
  return [sys.executable, "-m", "kvjax.eval", "--config", CONFIG, "--task", "passkey",
          "--scorer", scorer, "--lengths", str(n), "--depths", *map(str, args.depths),
          "--samples", str(args.samples), "--seed", str(args.seed), *overrides(name, d, args)], out


def scorer_of(name: str) -> str:
  """The forward pass where it stands for the cache (and is faster than decoding)."""
  return "generate" if name == "h2o" else "forward"


def mcnemar(a: list[bool], b: list[bool]) -> float:
  """Exact two-sided McNemar p-value of paired outcomes: a binomial test on the discordant
  pairs (1.0 when there are none)."""
  only_a = sum(x and not y for x, y in zip(a, b))
  only_b = sum(y and not x for x, y in zip(a, b))
  if only_a + only_b == 0:
    return 1.0
  return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def outcomes(records: list[dict]) -> list[tuple[int, float, str, bool]]:
  """Per prompt, in order: (length, depth, answer, correct): the pairing key and the result."""
  return [(r["length"], r["depth"], r["answer"], r["correct"]) for r in records]


def kv_density(name: str, d: float, n: int, args) -> float:
  """Decode-cache slots over dense at final length n (H2O keeps `d` of the prompt)."""
  if name == "dense":
    return 1.0
  if name == "h2o":
    return d
  o = dict(x.split("=", 1) for x in overrides(name, d, args))
  plan = load_plan(ROOT / o["model.moa.plan"])
  return plan.kv_density(n, int(o["model.moa.block_size"]), KV_HEADS)


def claim_at(d: float, runs: dict, args) -> tuple[dict, dict]:
  """The claim object at density d (accuracy, interval, McNemar p) and its details: over every
  length dense was measured at, with the methods measured at all of them, or, where MoA was not,
  over the lengths every method measured here shares."""
  rd = lambda name: 1.0 if name == "dense" else d
  present = {name: [n for n in args.lengths if (name, rd(name), n) in runs] for name in METHODS}
  lengths = present["dense"]
  if len(present["moa"]) < len(lengths):  # the claim's method decides: fewer lengths, all methods
    lengths = [n for n in args.lengths if all(n in ns for ns in present.values() if ns)]
  results = {name: [o for n in lengths
                    for o in outcomes(runs[(name, rd(name), n)]["result"]["result"]["records"])]
             for name, ns in present.items() if lengths and set(lengths) <= set(ns)}
  keys = {name: [o[:3] for o in rows] for name, rows in results.items()}
  if len({tuple(k) for k in keys.values()}) > 1:
    raise SystemExit(f"methods at density {d} were scored on different prompts")
  correct = {name: [o[3] for o in rows] for name, rows in results.items()}
  claim = {"density": d, "task": "passkey", "lengths": lengths,
           "n": len(next(iter(correct.values()))) if correct else 0,
           "methods": {name: {"accuracy": float(np.mean(c)), "ci95": wilson(sum(c), len(c))}
                       for name, c in correct.items()},
           "mcnemar_p": {f"{a}_vs_{b}": mcnemar(correct[a], correct[b])
                         for a, others in COMPARED.items() for b in others
                         if a in correct and b in correct}}
  details = {"lengths": lengths, "depths": args.depths, "prompts_per_depth": args.samples,
             "methods": {}}
  for name in results:
    rec = {n: runs[(name, rd(name), n)] for n in lengths}
    details["methods"][name] = {
        "overrides": overrides(name, d, args), "scorer": scorer_of(name),
        "kv_density": {str(n): kv_density(name, d, n, args) for n in lengths},
        "by_length": {str(n): r["result"]["result"]["by_length"][str(n)] for n, r in rec.items()},
        "by_depth": _by_depth(correct[name], [o[1] for o in results[name]]),
        "commands": [r["command"] for r in rec.values()],
        "seconds": sum(r["result"]["seconds"] for r in rec.values())}
  m = claim["methods"]
  if {"moa", "dense", "streaming_llm_4"} <= set(m):
    details["holds"] = bool(m["moa"]["accuracy"] >= 0.9 * m["dense"]["accuracy"]
                            and m["moa"]["accuracy"] > m["streaming_llm_4"]["accuracy"]
                            and claim["mcnemar_p"]["moa_vs_streaming_llm_4"] < 0.05)
  return claim, details


def _by_depth(correct: list[bool], depths: list[float]) -> dict:
  table = {}
  for c, x in zip(correct, depths):
    table.setdefault(f"{x:g}", []).append(c)
  return {k: float(np.mean(v)) for k, v in sorted(table.items(), key=lambda kv: float(kv[0]))}


def plan_spans(d: float, heads: list[dict], args) -> dict:
  """Per plan at density d: each K/V head's cache size at the longest length, and the sizes
  the plan gives the measured retrieval heads' K/V heads."""
  n, out = max(args.lengths), {}
  for name in ("moa", "moa_handmade"):
    path = WORK / f"{plan_stem(name, args)}_{d:g}.json"
    if not path.exists():
      continue
    sizes_LxH = load_plan(path).cache_sizes(n, args.block)
    kv_LxK = sizes_LxH.reshape(sizes_LxH.shape[0], KV_HEADS, -1).max(axis=2)
    out[name] = {"length": n, "kv_sizes": kv_LxK.tolist(),
                 "retrieval_heads": [{**h, "query_head_size": int(sizes_LxH[h["layer"],
                                                                           h["head"]])}
                                     for h in heads[:args.top]]}
  return out


def profile_vs_retrieval(args, mass_LxH: np.ndarray, local_blocks: int = 4) -> dict:
  """Whether the plan's profile finds the retrieval heads: per profiled length, each head's
  influence on blocks more than `local_blocks` behind the query (what a window drops), against
  its attention on a planted pass key (Spearman rank correlation, and how many of the top
  `--top` heads the two rankings share)."""
  out = {}
  pattern = f"profile_{args.calibration}_*_b{args.block}.npz"
  for path in sorted((WORK / "calibration").glob(pattern)):
    e_LxHxMxM = np.load(path)["influence"]
    m = e_LxHxMxM.shape[-1]
    i, j = np.arange(m)[:, None], np.arange(m)[None, :]
    far_LxH = (e_LxHxMxM * ((j <= i - local_blocks) & (j > 0))).sum(axis=(2, 3))
    top = lambda x: set(np.argsort(-x, axis=None)[:args.top].tolist())
    n = int(path.name.split("_")[2])
    out[str(n)] = {"spearman": float(stats.spearmanr(mass_LxH.ravel(), far_LxH.ravel())[0]),
                   "top_shared": len(top(mass_LxH) & top(far_LxH)), "top": args.top,
                   "far_influence_by_layer": (far_LxH.sum(1) / far_LxH.sum()).tolist()}
  return out


def top_sweep(args, d: float, runs: dict) -> list[dict]:
  """The mechanism's dose-response: hand-made plans keeping the top K heads at density `d`,
  passkey at the first length on the claim's prompts, paired against dense."""
  n, out = args.lengths[0], []
  dense = [o[3] for o in outcomes(runs[("dense", 1.0, n)]["result"]["result"]["records"])]
  for k in args.top_sweep:
    plan_path = WORK / f"moa_handmade_top{k}_{d:g}.json"
    record = run(moa_cli("heads-plan", "--heads", rel(WORK / "heads.json"), "--top", str(k),
                         "--density", str(d), "--lengths", *map(str, args.lengths), "--out",
                         rel(plan_path), *small_blocks(args)), plan_path, args.resume)
    result = run(*passkey_job(args, f"moa_handmade_top{k}", d, n, "forward"), args.resume)
    correct = [o[3] for o in outcomes(result["result"]["result"]["records"])]
    plan = load_plan(plan_path)
    out.append({"top": k, "plan_command": record["command"], "command": result["command"],
                "kv_density": plan.kv_density(n, args.block, KV_HEADS),
                "window_beta": min(b for row in plan.betas for b in row),
                "accuracy": float(np.mean(correct)), "ci95": wilson(sum(correct), len(correct)),
                "n": len(correct), "mcnemar_p_vs_dense": mcnemar(correct, dense)})
  return out


def plot(summary: dict) -> None:
  import matplotlib  # noqa: PLC0415 (plotting only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  claims = summary["claims"]
  fig, axes = plt.subplots(1, len(claims), figsize=(7 * len(claims), 4), squeeze=False)
  for ax, (d, details) in zip(axes[0], summary["claim_details"].items()):
    for name, rec in details["methods"].items():
      xs = sorted(rec["by_depth"], key=float)
      acc = claims[d]["methods"][name]
      ax.plot([float(x) for x in xs], [rec["by_depth"][x] for x in xs], marker="o",
              linestyle="-" if name.startswith(("dense", "moa")) else "--",
              label=f"{name} {acc['accuracy']:.2f} [{acc['ci95'][0]:.2f}, {acc['ci95'][1]:.2f}]")
    ax.set(title=f"passkey at density {d} (1,024 and 2,048 tokens)", xlabel="depth of the key",
           ylabel="accuracy", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
  save_plot(fig, "moa")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
  p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                 help="methods to run now (none: only the summary and the --top-sweep)")
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--depths", type=float, nargs="+",
                 default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
  p.add_argument("--samples", type=int, default=5, help="prompts per length and depth")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--heads-lengths", type=int, nargs="+", default=[1024])
  p.add_argument("--heads-samples", type=int, default=2)
  p.add_argument("--heads-seed", type=int, default=1, help="other prompts than the evaluation's")
  p.add_argument("--top", type=int, default=20, help="retrieval heads the hand-made plan keeps")
  p.add_argument("--top-sweep", type=int, nargs="*", default=[10, 20, 30, 45],
                 help="also hand-made plans keeping this many heads, at the first density and "
                      "length (needs dense there)")
  p.add_argument("--block", type=int, default=32, help="MoA block size (StreamingLLM-4's too)")
  p.add_argument("--sink", type=int, default=4, help="MoA sink tokens")
  p.add_argument("--profile-lengths", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--profile-samples", type=int, default=8)
  p.add_argument("--calibration", default="facts", help="what `kvjax.moa plan` profiles on")
  p.add_argument("--val-samples", type=int, default=2)
  p.add_argument("--response-tokens", type=int, default=16)
  p.add_argument("--alphas", type=int, nargs=3, default=[-512, 1024, 128])
  p.add_argument("--betas", type=float, nargs=3, default=[0, 1, 0.125])
  p.add_argument("--jobs", type=int, default=1, help="evaluation commands run at once")
  p.add_argument("--resume", action="store_true",
                 help="reuse results of commands already run with the same arguments")
  args = p.parse_args()
  WORK.mkdir(parents=True, exist_ok=True)
  wanted = set(args.methods)
  heads = retrieval_heads(args)["result"]["ranked"]
  plan_records = {f"{d:g}": plans(args, d, wanted) for d in args.densities}
  jobs = [(name, 1.0 if name == "dense" else d, n)
          for d in args.densities for n in args.lengths for name in METHODS
          if name in wanted and (name != "dense" or d == args.densities[0])]
  runs = {}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(run, *passkey_job(args, name, d, n, scorer_of(name)), args.resume):
               (name, d, n) for name, d, n in jobs}
    for future in concurrent.futures.as_completed(futures):
      runs[futures[future]] = future.result()
  for name in set(METHODS) - wanted:  # not run now: what an earlier pass measured still counts
    for d in args.densities:
      for n in args.lengths:
        rd = 1.0 if name == "dense" else d
        if record := saved_record(*passkey_job(args, name, rd, n, scorer_of(name))):
          runs[(name, rd, n)] = record
  summary = {"config": CONFIG, "args": vars(args), "retrieval_heads": heads[:args.top],
             "plans": plan_records,
             "claim": None, "claims": {}, "claim_details": {}, "plan_spans": {}}
  for d in args.densities:
    claim, details = claim_at(d, runs, args)
    summary["claims"][f"{d:g}"] = claim
    summary["claim_details"][f"{d:g}"] = details
    summary["plan_spans"][f"{d:g}"] = plan_spans(d, heads, args)
  if args.top_sweep and ("dense", 1.0, args.lengths[0]) in runs:
    d = args.densities[0]
    summary["top_sweep"] = {f"{d:g}": top_sweep(args, d, runs)}
  mass_LxH = np.asarray(retrieval_heads(args)["result"]["mass"])
  summary["profile_vs_retrieval_heads"] = profile_vs_retrieval(args, mass_LxH)
  summary["claim"] = summary["claims"].get("0.5")
  write_json("moa", summary)
  plot(summary)


if __name__ == "__main__":
  main()
