"""Train a kvjax model; resumes by itself from the latest checkpoint in the workdir.

  python train.py                                     # configs/tiny.yaml into runs/tiny
  python train.py --config configs/tiny.yaml train.steps=200 --workdir runs/short

The workdir receives config.yaml, orbax checkpoints, TensorBoard event files and metrics.jsonl.
SIGTERM or SIGINT (Ctrl-C) finishes the current step, checkpoints it and exits with code 0
(SIGTERM) or 130 (SIGINT); running the same command again continues exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/tiny.yaml"


def parse_args(argv):
  from kvjax import distributed  # noqa: PLC0415 (imports jax, which --help does not need)
  from kvjax.cli import ArgumentParser  # noqa: PLC0415

  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
  p.add_argument("--workdir", help="run directory (default runs/<config name>)")
  p.add_argument("--stop-at", type=int, metavar="STEP",
                 help="stop after this step with a checkpoint (the schedule still ends at "
                      "train.steps); run again to continue")
  p.add_argument("--resume-from-previous", action="store_true",
                 help="resume from the newest checkpoint that can be read, moving newer "
                      "unreadable ones to <workdir>/unreadable/")
  p.add_argument("overrides", nargs="*", metavar="key=value",
                 help="config overrides, e.g. model.num_layers=4 train.steps=30")
  distributed.add_flags(p)
  return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Imported after parsing so that `--help` and flag errors do not wait for the training stack.
  import jax  # noqa: PLC0415

  import kvjax  # noqa: PLC0415
  from kvjax import distributed  # noqa: PLC0415
  from kvjax.cli import UsageError, check_output, usage_errors  # noqa: PLC0415
  from kvjax.training import NonFiniteLossError, train  # noqa: PLC0415
  from kvjax.training.preemption import EXIT_CODES  # noqa: PLC0415

  with usage_errors():
    distributed.initialize(distributed.config_from(args))  # before anything touches a device
    cfg = kvjax.load_config(args.config, args.overrides)
    if args.stop_at is not None and args.stop_at < 1:
      raise UsageError(f"--stop-at must be >= 1, got {args.stop_at}")
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    check_output("--workdir", workdir, directory=True)
    try:
      result = train(cfg, workdir, stop_at=args.stop_at,
                     resume_from_previous=args.resume_from_previous)
    except NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  if result.stopped_by is not None:
    if jax.process_index() == 0:
      print(f"{result.stopped_by.name}: stopped after step {result.step}, its checkpoint is "
            f"committed in {workdir}; run the same command to continue")
    return EXIT_CODES[result.stopped_by]
  if jax.process_index() == 0:
    speed = "" if result.tokens_per_s is None else f"; {result.tokens_per_s:,.0f} training tokens/s"
    tokens = f"{cfg.model.weights}'s" if cfg.model.weights else cfg.data.tokenizer
    print(f"step {result.step}: validation loss {result.val_loss:.4f} nats/token "
          f"({tokens} tokens){speed}")
    for text in result.samples:
      print(f"--- sample ---\n{text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
