"""MoA's claim on SmolLM2-135M-Instruct: at equal KV-cache density, per-head elastic windows
keep long-context retrieval near dense while uniform windows (StreamingLLM) collapse; H2O
eviction at the same cache size is the other baseline.

  python benchmarks/moa.py                                   # the full run (hours on CPU)
  python benchmarks/moa.py --lengths 512 1024 2048 --samples 1 --profile-lengths 512 1024 \
      --profile-samples 2 --sinks 64                          # what fits about an hour on 2 cores

Every number comes from the project's CLIs, run as subprocesses and recorded with their
commands: plans from `python -m kvjax.moa`, retrieval and perplexity from `python -m kvjax.eval`,
KV bytes and decode tokens/s from `decode.py`. A plan already in the work folder is reused and
its search report recorded. Perplexity is teacher-forced under each method's prefill masks, which
H2O does not have (it evicts after a dense prefill), so H2O gets none. Results:
benchmarks/results/moa_<device>.json and .png (retrieval accuracy by context length, per method
and density).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, save_plot, write_json

CONFIG = "configs/smollm2_135m.yaml"
ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], out: Path | None = None) -> dict:
  """Runs one CLI command; returns its command line, wall time and JSON output."""
  cmd = [*cmd, "--json", str(out)] if out is not None and "--out" not in cmd else cmd
  print(f"$ {shlex.join(cmd)}", flush=True)
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True)
  record = {"command": shlex.join(cmd).replace(sys.executable, "python"),
            "wall_s": round(time.perf_counter() - start, 1)}
  if out is not None and out.suffix == ".json" and out.exists():
    record["result"] = json.loads(out.read_text())
  return record


def plans(args, work: Path) -> dict[str, dict]:
  """method name -> {"overrides": [...], "record": ...} for every method and density."""
  methods = {"dense": {"overrides": [], "density": 1.0}}
  for d in args.densities:
    moa = work / f"moa_{d:g}.json"
    if moa.exists():
      report = Path(f"{moa}.report.json")
      methods[f"moa_{d:g}_search"] = {"record": {
          "reused": str(moa.relative_to(ROOT)),
          "report": json.loads(report.read_text()) if report.exists() else None}}
    else:
      methods[f"moa_{d:g}_search"] = {"record": run([
          sys.executable, "-m", "kvjax.moa", "plan", "--config", CONFIG, "--out", str(moa),
          "--density", str(d), "--lengths", *map(str, args.profile_lengths),
          "--samples", str(args.profile_samples), "--val-samples", "1",
          "--alphas", *map(str, args.alphas), "--betas", "0", "1", "0.125"])}
    methods[f"moa_{d:g}"] = {"overrides": [f"model.moa_plan={moa}"], "density": d}
    stream = work / f"streaming_{d:g}.json"
    run([sys.executable, "-m", "kvjax.moa", "uniform", "--config", CONFIG, "--beta", str(d),
         "--out", str(stream)])
    for sinks in args.sinks:
      methods[f"streaming{sinks}_{d:g}"] = {
          "overrides": [f"model.moa_plan={stream}", f"model.moa_sink_tokens={sinks}"],
          "density": d}
    methods[f"h2o_{d:g}"] = {
        "overrides": ["model.eviction.policy=h2o", f"model.eviction.keep_ratio={d:g}"],
        "density": d}
  return methods


def evaluate(args, name: str, overrides: list[str], work: Path) -> dict:
  ev = [sys.executable, "-m", "kvjax.eval", "--config", CONFIG]
  long = ["--lengths", *map(str, args.lengths), "--depths", *map(str, args.depths),
          "--samples", str(args.samples)]
  evicts = any(o.startswith("model.eviction.policy=") for o in overrides)
  return {
      "passkey": run([*ev, "--task", "passkey", *long, *overrides], work / f"{name}_passkey.json"),
      "lines": run([*ev, "--task", "lines", *long, *overrides], work / f"{name}_lines.json"),
      "perplexity": None if evicts else run(
          [*ev, "--task", "perplexity", "--seq-len", str(args.ppl_seq_len), *overrides],
          work / f"{name}_ppl.json"),
      "decode": run([sys.executable, "decode.py", "--config", CONFIG, "--batch", "1",
                     "--prompt-len", str(args.decode_prompt), "--gen-len", "32", *overrides],
                    work / f"{name}_decode.json"),
  }


def plot(summary: dict) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, task in zip(axes, ("passkey", "lines")):
    for name, rec in summary["methods"].items():
      table = rec["eval"][task]["result"]["result"]["by_length"]
      lengths = sorted(int(n) for n in table)
      ax.plot(lengths, [table[str(n)]["accuracy"] for n in lengths], marker="o", label=name)
    ax.set(title=f"{task} retrieval", xlabel="context tokens", ylabel="accuracy", ylim=(-0.05, 1.05))
  axes[1].legend(fontsize=7)
  save_plot(fig, "moa")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
  p.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
  p.add_argument("--samples", type=int, default=2)
  p.add_argument("--profile-lengths", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--profile-samples", type=int, default=4)
  p.add_argument("--alphas", type=int, nargs=3, default=[-512, 2048, 256])
  p.add_argument("--sinks", type=int, nargs="+", default=[4, 64])
  p.add_argument("--ppl-seq-len", type=int, default=1024)
  p.add_argument("--decode-prompt", type=int, default=2048)
  args = p.parse_args()
  work = RESULTS / "moa"
  work.mkdir(parents=True, exist_ok=True)
  summary = {"config": CONFIG, "args": vars(args), "methods": {}}
  for name, spec in plans(args, work).items():
    if "overrides" not in spec:
      summary[name] = spec["record"]
      continue
    summary["methods"][name] = {"density": spec["density"], "overrides": spec["overrides"],
                                "eval": evaluate(args, name, spec["overrides"], work)}
    write_json("moa", summary)
  plot(summary)


if __name__ == "__main__":
  main()
