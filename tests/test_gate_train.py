"""Training gates on a frozen base: the gradient stays near the ungated model's while every head
evicts its target, only the gates train and are checkpointed, the eviction ratio per layer and
K/V head is logged, a restored model carries the base again."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import kvjax
from kvjax.training import restore_params, train
from kvjax.training.checkpoint import checkpoint_dir
from kvjax.training.loss import next_token_loss
from kvjax.training.params import LORA, init_lora, model_params
from tests.helpers import tiny_model

TINY = ("model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=24")
RUN = ("train.batch_size=4", "train.steps=4", "train.warmup_steps=1", "train.log_every=2",
       "train.eval_every=4", "train.checkpoint_every=4", "train.eval_batches=1",
       "train.sample_tokens=0")
GATE = ("model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
        "model.attention_gate.head_dim=8", "train.freeze_base=true")


def gradient_norms(evict: float | None, steps: int = 60):
  """Global gradient norm per step of gates and rank-2 LoRA adapters trained on a frozen random
  base whose attention is peaked (init std 0.2), on sequences whose second half repeats the
  first (copying reads far keys); `evict=None` trains the adapters of the ungated model. Returns
  the norms and the last step's eviction ratio per layer and K/V head."""
  gate = () if evict is None else (
      "model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
      "model.attention_gate.head_dim=8", "model.attention_gate.num_sinks=2",
      f"model.attention_gate.keep_ratio={1 - evict}")
  _, model, params = tiny_model("model.init_std=0.2", *gate)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  base = traverse_util.unflatten_dict({p: x for p, x in flat.items() if "filter" not in p})
  trained = traverse_util.unflatten_dict({p: x for p, x in flat.items() if "filter" in p})
  trained[LORA] = init_lora(base, ("q", "k", "v", "o"), 2, jax.random.key(1))
  half = np.random.default_rng(0).integers(0, 256, (8, 17))
  tokens = jnp.asarray(np.concatenate([half, half[:, 1:]], axis=1))
  opt = optax.adam(3e-3)

  @jax.jit
  def step(trained, opt_state):
    objective = lambda t: next_token_loss(model, model_params(base, t, 8.0), tokens, None)
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trained)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(trained, updates), opt_state, metrics, optax.tree.norm(grads)

  opt_state, norms = opt.init(trained), []
  for _ in range(steps):
    trained, opt_state, metrics, norm = step(trained, opt_state)
    norms.append(float(norm))
  evicted = {k: np.asarray(v) for k, v in metrics.items() if k.endswith("evict_ratio")}
  return np.array(norms), evicted


@pytest.fixture(scope="module")
def ungated_norms():
  return gradient_norms(None)[0]


@pytest.mark.parametrize("evict", [0.5, 0.75])
def test_gradient_stays_near_the_ungated_one_while_every_head_evicts_its_target(
    evict, ungated_norms):
  # Flags applied by renormalising probabilities reached 35x (50%) and 3e4x (75%) the ungated
  # norm at the same step here.
  norms, evicted = gradient_norms(evict)
  assert np.isfinite(norms).all()
  assert (norms < 10 * ungated_norms).all(), (norms / ungated_norms).max()
  assert len(evicted) == 2
  for ratio in evicted.values():  # per K/V head
    assert ratio.shape == (2,) and np.abs(ratio - evict).max() < 0.1, (evict, evicted)


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
