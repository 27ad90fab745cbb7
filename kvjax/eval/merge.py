"""Combine the JSON records of a multiple-choice task split into runs with --offset/--limit.

  python -m kvjax.eval.merge part0.json part1.json ... --json whole.json

Accuracies are question-weighted means, so the merge of disjoint runs that cover a task equals
one run over all of it. Runs must share the task, model, weights and scorer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kvjax.cli import UsageError, usage_errors

SAME = ("task", "config", "overrides", "weights", "checkpoint", "scorer")


def merge_records(records: Sequence[dict]) -> dict:
  """One record for the union of `records`; rejects mixed runs and overlapping question ranges."""
  if not records:
    raise UsageError("nothing to merge: give at least one result file")
  first = records[0]
  for key in SAME:
    values = {json.dumps(r.get(key)) for r in records}
    if len(values) > 1:
      raise UsageError(f"runs differ in {key!r} ({', '.join(sorted(values))}); merge only runs "
                       f"of one task, model and scorer")
  if any("questions" not in r["result"] for r in records):
    raise UsageError(f"only multiple-choice results can be merged; {first['task']!r} has no "
                     f"question count")
  ranges = sorted((r["offset"], r["offset"] + r["result"]["questions"])
                  for r in records if "offset" in r)
  for (_, end), (start, _) in zip(ranges, ranges[1:]):
    if start < end:
      raise UsageError(f"question ranges overlap: one run ends at {end}, another starts at "
                       f"{start}")
  total = sum(r["result"]["questions"] for r in records)
  metrics = [k for k in first["result"] if k.startswith("acc")]
  result = {k: sum(r["result"][k] * r["result"]["questions"] for r in records) / total
            for k in metrics} | {"questions": total}
  return {**{k: first.get(k) for k in SAME}, "seconds": sum(r["seconds"] for r in records),
          "device": first.get("device"), "runs": len(records), "result": result}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m kvjax.eval.merge", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("parts", nargs="+", help="--json files written by python -m kvjax.eval")
  p.add_argument("--json", help="write the merged record here")
  args = p.parse_args(argv)
  with usage_errors():
    for path in args.parts:
      if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    merged = merge_records([json.loads(Path(path).read_text()) for path in args.parts])
  merged["parts"] = args.parts
  print(f"{merged['task']}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in merged["result"].items())
        + f" ({merged['runs']} runs, {merged['seconds']:.0f} s)")
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(merged, indent=2))


if __name__ == "__main__":
  sys.exit(main())
