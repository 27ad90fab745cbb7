"""SmolLM2-135M-Instruct through kvjax: perplexity, zero-shot accuracy, long-context retrieval
and decode throughput, each run as the documented command and collected into one JSON file.

  python benchmarks/pretrained.py                     # everything below, in order
  python benchmarks/pretrained.py --only piqa passkey  # a subset
  python benchmarks/pretrained.py --mc-limit 300 --lengths 1000 2000 4000  # a cheaper run

Each step's own JSON lands in benchmarks/results/pretrained/; the summary in
benchmarks/results/pretrained_<device>.json lists every command with its numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import RESULTS, write_json

CONFIG = "configs/smollm2_135m.yaml"
EVAL = [sys.executable, "-m", "kvjax.eval", "--config", CONFIG]


def steps(args) -> dict[str, list[str]]:
  limit = ["--limit", str(args.mc_limit)] if args.mc_limit else []
  long = ["--lengths", *map(str, args.lengths), "--depths", "0", "0.5", "1", "--samples", "1"]
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
      "hellaswag": [*EVAL, "--task", "hellaswag", "--limit", str(args.hellaswag_limit)],
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="+", help="run only these steps")
  p.add_argument("--hellaswag-limit", type=int, default=500)
  p.add_argument("--mc-limit", type=int, help="ARC-Easy and PIQA: first N questions (default all)")
  p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
  args = p.parse_args()
  root = Path(__file__).resolve().parent.parent
  out_dir = RESULTS / "pretrained"
  out_dir.mkdir(parents=True, exist_ok=True)
  commands = {name: [*cmd, "--json", str((out_dir / f"{name}.json").relative_to(root))]
              for name, cmd in steps(args).items()}
  for name, cmd in commands.items():
    if args.only and name not in args.only:
      continue
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=root, check=True)
    # Every step present so far, each with the command that produced it (results from an
    # earlier run of this script, or the same command run by hand, are kept).
    summary = {}
    for step, step_cmd in commands.items():
      out = out_dir / f"{step}.json"
      if out.is_file():
        summary[step] = {"command": shlex.join(step_cmd).replace(sys.executable, "python"),
                         "result": json.loads(out.read_text())}
    write_json("pretrained", summary)

if __name__ == "__main__":
  main()
