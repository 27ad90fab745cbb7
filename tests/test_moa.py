"""MoA plans (format, validation, config) and the block-sparse prefill."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.errors import ConfigError
from kvjax.layers.dot_product import dot_product_attention
from kvjax.moa.masks import prefill_mask
from kvjax.moa.plan import Plan, load_plan, uniform_plan
from kvjax.moa.prefill import block_sparse_attention
from tests.helpers import TINY, random_tokens, tiny_model

PLAN = Plan(alphas=((16.0, 0.0, -8.0, 8.0), (0.0, 40.0, 4.0, 0.0)),
            betas=((0.0, 0.25, 0.5, 0.0), (1.0, 0.0, 0.125, 0.0)))


def test_plan_json_round_trip_is_the_authors_format(tmp_path):
  path = tmp_path / "plan.json"
  PLAN.save(path)
  data = json.loads(path.read_text())
  assert set(data) == {"alphas", "betas"}
  assert data["alphas"][1] == [0.0, 40.0, 4.0, 0.0]
  assert load_plan(path) == PLAN


@pytest.mark.parametrize("data, message", [
    ({"alphas": [[0.0]]}, "exactly the keys 'alphas' and 'betas'"),
    ({"alphas": [[0.0], [1.0, 2.0]], "betas": [[0.5], [0.5]]}, "same number of heads"),
    ({"alphas": [[0.0]], "betas": [[1.5]]}, r"betas\[0\]\[0\] must be in \[0, 1\]"),
    ({"alphas": [["x"]], "betas": [[0.5]]}, r"alphas\[0\]\[0\] must be a finite number"),
    ({"alphas": [[0.0, 1.0]], "betas": [[0.5]]}, "must have the same shape"),
    ({"alphas": [], "betas": []}, "non-empty list"),
])
def test_malformed_plans_are_rejected_with_the_reason(tmp_path, data, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ConfigError, match=message):
    load_plan(path)


def test_config_validates_the_plan_against_the_model(tmp_path):
  path = tmp_path / "plan.json"
  PLAN.save(path)
  cfg = kvjax.load_config(None, [*TINY, f"model.moa.plan={path}"])
  assert cfg.model.moa.plan == str(path)
  with pytest.raises(ConfigError, match="rules for 2 layers, the model has model.num_layers=3"):
    kvjax.load_config(None, [*TINY, f"model.moa.plan={path}", "model.num_layers=3"])
  with pytest.raises(ConfigError, match="4 heads per layer, the model has model.num_heads=8"):
    kvjax.load_config(None, [*TINY, f"model.moa.plan={path}", "model.num_heads=8",
                             "model.head_dim=8"])
  with pytest.raises(ConfigError, match="no such file"):
    kvjax.load_config(None, [*TINY, f"model.moa.plan={tmp_path}/missing.json"])
  (tmp_path / "junk.json").write_text("{not json")
  with pytest.raises(ConfigError, match="is not valid JSON"):
    kvjax.load_config(None, [*TINY, f"model.moa.plan={tmp_path}/junk.json"])
  with pytest.raises(ConfigError, match="model.moa.sink_tokens: must be in"):
    kvjax.load_config(None, [*TINY, "model.moa.sink_tokens=80"])


def test_cache_sizes_follow_the_formula():
  # N = 100, block 16: spans 16, 25, 42, 8 -> at least 32, rounded up to blocks.
  sizes = PLAN.cache_sizes(100, 16)
  np.testing.assert_array_equal(sizes[0], [32, 32, 48, 32])
  # 100 (clipped to N) -> 112; 40 -> 48; 16 -> 32; 0 -> 32.
  np.testing.assert_array_equal(sizes[1], [112, 48, 32, 32])


def test_prefill_mask_by_hand():
  # block 2, sink 1, one local block: query 5 (block 2) sees key 0 (sink) and keys 4, 5.
  mask = prefill_mask(6, [1], block=2, sink=1)[0]
  assert list(np.nonzero(mask[5])[0]) == [0, 4, 5]
  assert list(np.nonzero(mask[3])[0]) == [0, 2, 3]
  assert list(np.nonzero(mask[1])[0]) == [0, 1]


@pytest.mark.parametrize("t", [7, 45])
def test_block_sparse_prefill_equals_dense_masked_attention(t):
  b, h, kh, d = 2, 4, 2, 8
  ks = jax.random.split(jax.random.key(t), 3)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kh, d)) for key in ks[1:])
  num_local = (1, 2, 5, 6)  # block 8: at t=45 (6 blocks) the last head is dense
  out = jax.jit(lambda *x: block_sparse_attention(*x, num_local, block=8, sink=3))(q, k, v)
  mask = jnp.broadcast_to(prefill_mask(t, num_local, 8, 3), (b, h, t, t))
  np.testing.assert_allclose(out, jax.jit(dot_product_attention)(q, k, v, mask), atol=1e-5)


def test_block_sparse_prefill_skips_masked_blocks():
  """The compiled sparse attention does work in proportion to the band, not to T^2."""
  def flops(num_local, t=512):
    x = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    f = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, num_local, block=32, sink=32))
    return f.lower(x, x, x).compile().cost_analysis()["flops"]
  dense, quarter, narrow = flops((16, 16)), flops((3, 3)), flops((1, 1))
  assert quarter < 0.35 * dense
  assert narrow < 0.6 * quarter


def test_model_with_a_plan_uses_its_windows(tmp_path):
  cfg, model, params = tiny_model("model.max_seq_len=128")
  tokens = random_tokens(2, 96, seed=1)
  dense = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
  full, narrow = tmp_path / "full.json", tmp_path / "narrow.json"
  uniform_plan(2, 4, alpha=0, beta=1.0).save(full)
  uniform_plan(2, 4, alpha=0, beta=0.0).save(narrow)
  def moa(path):
    model = kvjax.build_model(kvjax.load_config(None, [
        *TINY, "model.max_seq_len=128", f"model.moa.plan={path}", "model.moa.block_size=16",
        "model.moa.sink_tokens=4"]).model)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
  np.testing.assert_allclose(moa(full), dense, atol=1e-4)
  sparse = moa(narrow)
  # Two blocks (sink + one local block) cover positions < 32 exactly; later ones differ.
  np.testing.assert_allclose(sparse[:, :32], dense[:, :32], atol=1e-4)
  assert np.abs(sparse[:, 40:] - dense[:, 40:]).max() > 1e-2
