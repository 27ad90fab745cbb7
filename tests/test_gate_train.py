"""Training gates on a frozen base: only the gates train and are checkpointed, the eviction
ratio per layer and K/V head is logged, a restored model carries the base again."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import kvjax
from kvjax.training import restore_params, train
from kvjax.training.checkpoint import checkpoint_dir

TINY = ("model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=24")
RUN = ("train.batch_size=4", "train.steps=4", "train.warmup_steps=1", "train.log_every=2",
       "train.eval_every=4", "train.checkpoint_every=4", "train.eval_batches=1",
       "train.sample_tokens=0")
GATE = ("model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
        "model.attention_gate.head_dim=8", "train.freeze_base=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  text = tmp_path_factory.mktemp("text")
  rng = np.random.default_rng(0)
  words = ["thee", "thou", "art", "love", "night", "sweet", "my", "lord"]
  (text / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
  base_dir, gate_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("gate")
  base_cfg = kvjax.load_config(None, [*TINY, *RUN, f"data.source={text}"])
  train(base_cfg, base_dir)
  gate_cfg = kvjax.load_config(None, [*TINY, *RUN, *GATE, f"data.source={text}",
                                      f"train.base={base_dir}"])
  train(gate_cfg, gate_dir)
  return base_cfg, base_dir, gate_cfg, gate_dir


def test_checkpoint_holds_only_the_gates(runs):
  _, _, _, gate_dir = runs
  meta = json.loads(next(checkpoint_dir(gate_dir).glob("*/params/_METADATA")).read_text())
  names = meta["tree_metadata"].keys()
  assert names and all("'attn', 'filter'" in n for n in names)  # stringified path tuples


def test_restored_model_is_the_frozen_base_plus_trained_gates(runs):
  base_cfg, base_dir, gate_cfg, gate_dir = runs
  base = traverse_util.flatten_dict(restore_params(base_dir, base_cfg))
  full = traverse_util.flatten_dict(restore_params(gate_dir, gate_cfg))
  added = set(full) - set(base)
  assert added and all(p[p.index("attn") + 1] == "filter" for p in added)
  for path, leaf in base.items():
    np.testing.assert_array_equal(full[path], leaf)
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  assert kvjax.build_model(gate_cfg.model).apply({"params": traverse_util.unflatten_dict(full)},
                                                 tokens).shape == (1, 8, 264)


def test_eviction_ratio_per_layer_and_head_is_logged(runs):
  *_, gate_dir = runs
  lines = [json.loads(line) for line in (Path(gate_dir) / "metrics.jsonl").read_text().splitlines()]
  logged = {k for m in lines for k in m}
  for layer in range(2):
    for head in range(2):
      assert f"layer_{layer}/attn/filter/evict_ratio/{head}" in logged
  assert "lm_loss" in logged and list(Path(gate_dir).glob("events.out.tfevents*"))
