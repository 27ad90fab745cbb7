"""decode.py as a user runs it: JSON contract, side-by-side ratios, text mode, exit-2 errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("method", "params", "batch", "prompt_len", "gen_len", "prefill_s", "decode_s",
          "prefill_tokens_per_s", "decode_tokens_per_s", "ms_per_step", "kv_cache_bytes",
          "kv_bytes_per_token", "device", "jax_version")
SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.mlp_dim=128"]


def run(*argv, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "decode.py"), *argv], capture_output=True,
                        text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
  d = tmp_path_factory.mktemp("cfg")
  (d / "gqa.yaml").write_text("model:\n  num_kv_heads: 2\n")
  (d / "mqa.yaml").write_text("model:\n  num_kv_heads: 1\n")
  return d


def test_throughput_json_and_side_by_side_ratios(configs, tmp_path):
  out = tmp_path / "r.json"
  proc = run("--config", str(configs / "gqa.yaml"), "--config", str(configs / "mqa.yaml"),
             "--batch", "2", "--prompt-len", "8", "--gen-len", "6", "--json", str(out),
             "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.mlp_dim=128")
  assert proc.returncode == 0, proc.stderr
  runs = json.loads(out.read_text())["runs"]
  for r in runs:
    assert set(FIELDS) <= set(r)
    assert r["batch"] == 2 and r["prompt_len"] == 8 and r["gen_len"] == 6
    assert r["kv_cache_bytes"] == r["kv_bytes_per_token"] * 2 * 14
  assert runs[0]["kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 4  # K,V x kv heads x head dim x layers x f32
  assert runs[1]["ratios_vs_first"]["kv_cache_bytes"] == 0.5
  assert "kv_cache_bytes x0.50" in proc.stdout


def test_prompt_mode_generates_text(configs):
  proc = run("--config", str(configs / "gqa.yaml"), "--prompt", "To be", "--gen-len", "5",
             "--batch", "2", *SMALL)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("--- To be") == 2


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--prompt-len", "500", "--gen-len", "100"], "exceeds model.max_seq_len=512"),
    (["--checkpoint", "/nonexistent/dir"], "--checkpoint /nonexistent/dir: no such directory"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["model.nope=1"], "model.nope: unknown key"),
])
def test_bad_input_exits_2_with_one_line(configs, argv, message, tmp_path):
  proc = run("--config", str(configs / "gqa.yaml"), *argv, "--json", str(tmp_path / "x.json"), *SMALL)
  assert proc.returncode == 2
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_chat_with_a_pretrained_checkpoint_uses_its_template():
  proc = run("--config", "configs/smollm2_135m.yaml", "--prompt", "What is the capital of France?",
             "--temperature", "0", "--batch", "1", "--gen-len", "12")
  assert proc.returncode == 0, proc.stderr
  assert "The capital of France is Paris." in proc.stdout
