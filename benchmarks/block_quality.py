"""Block Transformer vs vanilla language-model loss at equal non-embedding size (arXiv 2406.02657).

  python -m benchmarks.block_quality [--workdir runs/block_quality] [key=value ...]

Trains configs/block_5m.yaml and configs/vanilla_5m.yaml (~5M non-embedding parameters each,
byte-level Shakespeare) with kvjax's trainer on the same token budget, initialisation seed and
data order, then reports on the validation split the loss ratio block / vanilla (paper: 1.19 at
this size) and the loss by position within a block (paper: U-shaped for the block model). The
block model is trained and scored with its own objective (`kvjax.models.block_transformer.loss`:
0..3 pad tokens before every document, pad targets not scored).

A finished run in `--workdir/<model>` is resumed, not retrained.
Writes benchmarks/results/block_quality_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kvjax  # noqa: E402
from benchmarks.common import save_plot, write_json  # noqa: E402
from kvjax.cli import usage_errors  # noqa: E402
from kvjax.data.pipeline import make_data  # noqa: E402
from kvjax.models import block_transformer  # noqa: E402
from kvjax.training import restore_params, train  # noqa: E402

MODELS = {"vanilla": "configs/vanilla_5m.yaml", "block": "configs/block_5m.yaml"}
PAPER_RATIO = 1.19


def vanilla_loss_by_position(model, params, tokens_BxT1, block_len: int):
  """Next-token loss grouped by the target's position modulo `block_len` (a flat reference)."""
  logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1])
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:])
  position_TxL = jax.nn.one_hot(jnp.arange(1, ce_BxT.shape[1] + 1) % block_len, block_len)
  return jnp.einsum("bt,tl->l", ce_BxT, position_TxL) / jnp.sum(position_TxL, 0) / ce_BxT.shape[0]


def loss_by_position(name: str, cfg, params, batches, block_len: int) -> list[float]:
  """Mean over the validation batches (equal sizes) of the loss at each position in a block."""
  model = kvjax.build_model(cfg.model)
  if name == "block":
    fn = jax.jit(lambda p, t: block_transformer.loss(model, p, t, jax.random.PRNGKey(0))[1][
        "loss_by_block_position"])
  else:
    fn = jax.jit(functools.partial(vanilla_loss_by_position, model, block_len=block_len))
  return np.mean([np.asarray(fn(params, jnp.asarray(b))) for b in batches], axis=0).tolist()


def plot(results: dict, block_len: int):
  fig, ax = plt.subplots(figsize=(5, 4))
  for name, r in results.items():
    ax.plot(range(block_len), r["val_loss_by_block_position"], marker="o",
            label=f"{name} (val loss {r['val_loss']:.3f})")
  ax.set_xticks(range(block_len))
  ax.set_xlabel("target position within a block")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.legend()
  ax.set_title("Loss by position within a block, 5M models")
  return fig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/block_quality")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both configs")
  args = p.parse_args()
  # The block model's objective (until the trainer's registry names it).
  results = {}
  with usage_errors():
    cfgs = {name: kvjax.load_config(path, args.overrides) for name, path in MODELS.items()}
  block_len = cfgs["block"].model.block.block_len
  for name, cfg in cfgs.items():
    t0 = time.perf_counter()
    result = train(cfg, f"{args.workdir}/{name}")
    seconds = time.perf_counter() - t0
    params = restore_params(f"{args.workdir}/{name}", cfg)
    batches = make_data(cfg).val_batches
    results[name] = {
        "config": MODELS[name], "val_loss": result.val_loss, "train_seconds": seconds,
        "tokens_per_s": result.tokens_per_s,
        "val_loss_by_block_position": loss_by_position(name, cfg, params, batches, block_len),
        "sample": result.samples[0] if result.samples else ""}
    print(f"{name}: val loss {result.val_loss:.4f} after {cfg.train.steps} steps "
          f"({seconds:.0f} s); by position in a block: "
          + " ".join(f"{x:.3f}" for x in results[name]["val_loss_by_block_position"]))
  ratio = results["block"]["val_loss"] / results["vanilla"]["val_loss"]
  print(f"val loss ratio block / vanilla: {ratio:.3f} (paper at 5M: {PAPER_RATIO})")
  tcfg, dcfg = cfgs["block"].train, cfgs["block"].data
  write_json("block_quality", {
      "overrides": args.overrides, "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "budget": {"steps": tcfg.steps, "batch_size": tcfg.batch_size, "seq_len": dcfg.seq_len,
                 "tokens": tcfg.steps * tcfg.batch_size * dcfg.seq_len},
      "val_loss_ratio_block_over_vanilla": ratio, "paper_ratio": PAPER_RATIO,
      "models": results})
  save_plot(plot(results, block_len), "block_quality")


if __name__ == "__main__":
  main()
