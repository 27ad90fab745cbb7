"""Config loading: YAML + overrides, and one clear ConfigError for every bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

import kvjax
from kvjax.checks import load_config
from kvjax.config import parse_override
from kvjax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_apply():
  cfg = load_config(None, ["model.num_layers=3", "train.steps=30", "model.rope_theta=5e5",
                           "model.tie_embeddings=false", "data.source=/tmp/x"])
  assert cfg.model.num_layers == 3 and cfg.train.steps == 30
  assert cfg.model.rope_theta == 500000.0 and cfg.model.tie_embeddings is False
  assert cfg.data.source == "/tmp/x"


def test_yaml_file_then_overrides(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  num_layers: 6\n  num_kv_heads: 2\ntrain:\n  lr: 0.001\n")
  cfg = load_config(path, ["model.num_layers=2"])
  assert (cfg.model.num_layers, cfg.model.num_kv_heads, cfg.train.lr) == (2, 2, 0.001)


def test_every_shipped_config_loads():
  paths = sorted((ROOT / "configs").glob("*.yaml"))
  assert paths, "configs/ has no YAML files"
  for path in paths:
    load_config(path)


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=3", "model.num_layer: unknown key; allowed:"),
    ("modle.num_layers=3", "modle: unknown key; allowed: data, mesh, model, train"),
    ("model.num_layers=three", "model.num_layers: must be an integer, got 'three'"),
    ("model.num_layers=2.5", "model.num_layers: must be an integer"),
    ("model.tie_embeddings=1", "model.tie_embeddings: must be true or false"),
    ("model.num_layers=0", "model.num_layers: must be > 0"),
    ("model.num_heads=5", "model.num_heads: must divide model.d_model=256"),
    ("model.num_kv_heads=3", "model.num_kv_heads: must divide model.num_heads=8, got 3"),
    ("model.head_dim=7", "model.head_dim: must be even for RoPE"),
    ("model.dtype=float64", "model.dtype: got 'float64', allowed: float32, bfloat16, float16"),
    ("model.attention_impl=cuda", "model.attention_impl: got 'cuda', allowed: auto, xla, pallas"),
    ("model.vocab_size=100", "model.vocab_size: must be >= 259 for data.tokenizer='byte'"),
    ("data.seq_len=4096", "data.seq_len: must be <= model.max_seq_len=512"),
    ("data.tokenizer=sentencepiece", "data.tokenizer: got 'sentencepiece'"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.lr=nan", "train.lr: must be finite"),
    ("mesh.data=-1", None),
    ("model.num_layers.x=1", "model.num_layers: must be an integer, got {'x': 1}"),
    ("model.num_layers", "overrides look like section.key=value"),
    ("model=3", "model: must be a mapping of ModelConfig fields"),
])
def test_bad_overrides_raise_one_clear_error(override, message):
  if message is None:
    load_config(None, [override])
    return
  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  assert message in str(e.value)


def test_mesh_allows_only_one_fill_axis():
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    load_config(None, ["mesh.fsdp=-1"])


def test_bad_yaml_and_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="no such file"):
    load_config(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(bad)
  listy = tmp_path / "list.yaml"
  listy.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="must be a mapping of sections"):
    load_config(listy)


def test_override_values_parse_as_yaml_scalars():
  assert parse_override("model.num_layers=4") == ("model.num_layers", 4)
  assert parse_override("data.source=a=b") == ("data.source", "a=b")
  assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4  # a string in YAML 1.1


def test_config_is_frozen():
  cfg = kvjax.load_config()
  with pytest.raises(AttributeError):
    cfg.model.num_layers = 1  # type: ignore[misc]


def test_kv_bytes_per_token_formula():
  cfg = load_config(None, ["model.num_kv_heads=2", "model.num_layers=3", "model.cache_dtype=bfloat16"])
  assert cfg.model.kv_bytes_per_token() == 2 * 2 * 32 * 3 * 2


@pytest.mark.parametrize("script", ["decode.py"])
def test_cli_config_error_exits_2_without_traceback(script, tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / script), "model.num_kv_heads=3"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "model.num_kv_heads: must divide model.num_heads" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert list(tmp_path.iterdir()) == []
