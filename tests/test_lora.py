"""LoRA on a frozen base: zero adapters give the base, training moves only gates and adapters,
checkpoints hold only those, and a restored model is the base with the adapters merged in."""

import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import kvjax
from kvjax import registry
from kvjax.errors import ConfigError
from kvjax.training import restore_params, train
from kvjax.training.checkpoint import checkpoint_dir
from kvjax.training.params import LORA, apply_lora, init_lora, init_params, split_params
from kvjax.training.step import compiled_steps

TINY = ("model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "model.max_seq_len=32", "data.seq_len=24")
RUN = ("train.batch_size=4", "train.steps=3", "train.warmup_steps=1", "train.log_every=3",
       "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=1",
       "train.sample_tokens=0", "train.lr=1e-2")
GATE = ("model.attention_gate.enable=true", "model.attention_gate.num_heads=2",
        "model.attention_gate.head_dim=8")
LORA_RUN = ("train.freeze_base=true", "train.lora_rank=2")


@pytest.fixture(scope="module")
def runs(text_dir, tmp_path_factory):
  base_dir, lora_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("lora")
  base_cfg = kvjax.load_config(None, [*TINY, *RUN, f"data.source={text_dir}"])
  train(base_cfg, base_dir)
  lora_cfg = kvjax.load_config(None, [*TINY, *RUN, *GATE, *LORA_RUN, f"data.source={text_dir}",
                                      f"train.base={base_dir}", "train.lora_targets=[q, v, up]"])
  train(lora_cfg, lora_dir)
  return (base_cfg, restore_params(base_dir, base_cfg)), (lora_cfg, lora_dir)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_zero_b_gives_the_base_model(runs):
  (base_cfg, base), _ = runs
  adapters = init_lora(base, ("q", "k", "v", "o", "gate", "up", "down"), 3, jax.random.key(1))
  assert all(np.any(a != 0) for p, a in flat(adapters).items() if p.endswith("/a"))
  merged = apply_lora(base, adapters, 4.0)
  tokens = jnp.arange(12, dtype=jnp.int32)[None] % 200
  model = kvjax.build_model(base_cfg.model)
  np.testing.assert_array_equal(model.apply({"params": merged}, tokens),
                                model.apply({"params": base}, tokens))


def test_delta_is_a_b_reshaped_to_the_kernel(runs):
  (_, base), _ = runs
  adapters = init_lora(base, ("q", "o"), 2, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.5, adapters)  # nonzero B
  merged, base_flat, ad = flat(apply_lora(base, adapters, 3.0)), flat(base), flat(adapters)
  q, o = "layer_0/attn/q/kernel", "layer_1/attn/o/kernel"
  _, heads, hd = base_flat[q].shape  # [in, heads, head_dim]
  np.testing.assert_allclose(merged[q], base_flat[q] + 3.0 * np.einsum(
      "ir,rhd->ihd", ad[f"{q}/a"], ad[f"{q}/b"].reshape(2, heads, hd)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(merged[o], base_flat[o] + 3.0 * np.einsum(
      "ir,rd->id", ad[f"{o}/a"], ad[f"{o}/b"]).reshape(base_flat[o].shape), rtol=1e-5,
      atol=1e-6)
  untouched = [p for p in base_flat if "/q/" not in p and "/o/" not in p]
  assert untouched and all(np.array_equal(merged[p], base_flat[p]) for p in untouched)


def test_a_step_changes_lora_and_gates_not_the_base(runs, text_dir):
  (_, base), (lora_cfg, _) = runs
  steps = compiled_steps(lora_cfg.model, lora_cfg.train, lora_cfg.mesh, lora_cfg.data.seq_len)
  # Copies: the step donates the whole state, frozen base included.
  after = steps.init(jax.random.PRNGKey(0)).replace(frozen=jax.tree.map(jnp.copy, steps.frozen))
  before_f = flat(jax.device_get(after.params))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (4, 25)), jnp.int32)
  for _ in range(2):  # the warmup's learning rate is 0 at step 0
    after, _ = steps.train_step(after, tokens)
  after_f = flat(after.params)
  assert set(after_f) == set(before_f)
  lora_b = [p for p in after_f if p.startswith(f"{LORA}/") and p.endswith("/b")]
  assert lora_b and all(np.any(after_f[p] != 0) for p in lora_b)
  assert not np.array_equal(after_f["layer_0/attn/filter/score/kernel"],
                            before_f["layer_0/attn/filter/score/kernel"])
  for path, leaf in flat(after.frozen).items():
    np.testing.assert_array_equal(leaf, flat(base)[path])


def test_checkpoint_holds_only_gates_and_lora(runs):
  _, (lora_cfg, lora_dir) = runs
  meta = json.loads(next(checkpoint_dir(lora_dir).glob("*/params/_METADATA")).read_text())
  paths = [ast.literal_eval(name) for name in meta["tree_metadata"]]
  lora = [p for p in paths if p[0] == LORA]
  gates = [p for p in paths if registry.is_added_param(lora_cfg.model, p)]
  assert all("filter" in p for p in gates)
  assert lora and gates and len(lora) + len(gates) == len(paths)
  assert {p[-3] for p in lora} == {"q", "v", "up"}  # the module holding each adapted kernel


def test_restore_gives_base_plus_delta(runs):
  (_, base), (lora_cfg, lora_dir) = runs
  restored = flat(restore_params(lora_dir, lora_cfg))
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from kvjax.training.checkpoint import _manager  # noqa: PLC0415 (the raw saved tree)
  with _manager(lora_dir, ocp.CheckpointManagerOptions(create=False)) as m:
    saved = m.restore(m.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore())).params
  ad = flat(saved[LORA])
  scale = lora_cfg.train.lora_alpha / lora_cfg.train.lora_rank
  for path, w in flat(base).items():
    if f"{path}/a" in ad:
      delta = (ad[f"{path}/a"] @ ad[f"{path}/b"]).reshape(w.shape)
      assert np.abs(delta).max() > 0
      np.testing.assert_allclose(restored[path], w + scale * delta, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(restored[path], w)
  gate = flat(saved)["layer_1/attn/filter/bias"]
  np.testing.assert_array_equal(restored["layer_1/attn/filter/bias"], gate)


@pytest.mark.parametrize("overrides, key", [
    (("train.freeze_base=true", "train.base=x", "train.lora_rank=-1"), "train.lora_rank"),
    (("train.freeze_base=true", "train.base=x", "train.lora_rank=2",
      "train.lora_targets=[q, attn]"), "train.lora_targets"),
    (("train.freeze_base=true", "train.base=x", "train.lora_rank=2", "train.lora_targets=[]"),
     "train.lora_targets"),
    (("train.base=x", "train.lora_rank=2"), "train.lora_rank"),
    (("train.lora_rank=2",), "train.lora_rank"),
])
def test_config_errors(overrides, key):
  with pytest.raises(ConfigError, match=key):
    kvjax.load_config(None, overrides)


def test_frozen_base_lacking_a_non_gate_parameter_is_rejected(runs):
  (_, base), (lora_cfg, _) = runs
  model = kvjax.build_model(lora_cfg.model)
  params = init_params(model, 8, jax.random.PRNGKey(0))
  partial = flat(base)
  del partial["layer_1/mlp_norm/scale"]
  with pytest.raises(ConfigError, match="layer_1/mlp_norm/scale"):
    split_params(params, traverse_util.unflatten_dict(partial, sep="/"), lora_cfg.model)
