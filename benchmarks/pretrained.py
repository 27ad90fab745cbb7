"""SmolLM2-135M-Instruct through kvjax: perplexity, zero-shot accuracy, long-context retrieval
and decode throughput, each run as the documented command and collected into one JSON file.

  python -m benchmarks.pretrained                     # everything below, in order
  python -m benchmarks.pretrained --resume            # skip steps whose JSON already exists
  python -m benchmarks.pretrained --only piqa passkey  # a subset
  python -m benchmarks.pretrained --mc-limit 300 --lengths 1000 2000 4000  # a cheaper run

Each step's own JSON lands in benchmarks/results/pretrained/; the summary in
benchmarks/results/pretrained_<device>.json lists every command with its numbers. HellaSwag
runs in parts of --chunk questions (each resumable), merged by `python -m kvjax.eval.merge`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, write_json

CONFIG = "configs/smollm2_135m.yaml"
EVAL = [sys.executable, "-m", "kvjax.eval", "--config", CONFIG]
ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = RESULTS / "pretrained"


def out_json(step: str) -> str:
  """Where a step writes its JSON, relative to the repository root (the commands' cwd)."""
  return str((OUT_DIR / f"{step}.json").relative_to(ROOT))


def group(step: str) -> str:
  """The step's name for --only: HellaSwag's parts belong to 'hellaswag'."""
  return re.sub(r"_\d{5}$", "", step)


def hellaswag_steps(args) -> dict[str, list[str]]:
  """One step per --chunk questions, then the question-weighted merge of every part."""
  from kvjax.eval import load_questions  # noqa: PLC0415
  total = args.mc_limit or len(load_questions("hellaswag"))
  parts = {f"hellaswag_{offset:05d}": [*EVAL, "--task", "hellaswag", "--offset", str(offset),
                                       "--limit", str(min(args.chunk, total - offset))]
           for offset in range(0, total, args.chunk)}
  merge = [sys.executable, "-m", "kvjax.eval.merge", *map(out_json, parts)]
  return parts | {"hellaswag": merge}


def steps(args) -> dict[str, list[str]]:
  limit = ["--limit", str(args.mc_limit)] if args.mc_limit else []
  long = ["--lengths", *map(str, args.lengths), "--depths", "0", "0.5", "1",
          "--samples", str(args.samples)]
  return {
      "perplexity": [*EVAL, "--task", "perplexity", "--seq-len", "512"],
      "arc_easy": [*EVAL, "--task", "arc_easy", *limit],
      "piqa": [*EVAL, "--task", "piqa", *limit],
      "passkey": [*EVAL, "--task", "passkey", *long],
      "lines": [*EVAL, "--task", "lines", *long],
      "decode_b1": [sys.executable, "decode.py", "--config", CONFIG, "--batch", "1",
                    "--prompt-len", "128", "--gen-len", "64"],
      "decode_b16": [sys.executable, "decode.py", "--config", CONFIG, "--batch", "16",
                     "--prompt-len", "128", "--gen-len", "64"],
      **hellaswag_steps(args),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="+", help="run only these steps")
  p.add_argument("--resume", action="store_true",
                 help="skip steps whose JSON already exists (merges are always redone)")
  p.add_argument("--chunk", type=int, default=1000, help="HellaSwag questions per part")
  p.add_argument("--mc-limit", type=int, help="multiple choice: first N questions (default all)")
  p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
  p.add_argument("--samples", type=int, default=2, help="long-context samples per length x depth")
  args = p.parse_args()
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  commands = {name: [*cmd, "--json", out_json(name)] for name, cmd in steps(args).items()}
  for name, cmd in commands.items():
    done = (ROOT / out_json(name)).is_file() and "kvjax.eval.merge" not in cmd  # merges are cheap
    if args.only and group(name) not in args.only or args.resume and done:
      continue
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
  # Every step present, each with the command that produced it (results from an earlier run
  # of this script, or the same command run by hand, are kept).
  summary = {}
  for step, step_cmd in commands.items():
    out = ROOT / out_json(step)
    if out.is_file():
      summary[step] = {"command": shlex.join(step_cmd).replace(sys.executable, "python"),
                       "result": json.loads(out.read_text())}
  write_json("pretrained", summary)


if __name__ == "__main__":
  main()
