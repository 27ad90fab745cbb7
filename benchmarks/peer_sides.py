"""The two sides of `benchmarks.peers`, each run in a process of its own:

  python -m benchmarks.peer_sides transformers GGUF_PATH
  python -m benchmarks.peer_sides kvjax [key=value ...]

A side loads once, then answers pickled `(prompts_BxT, gen_len)` requests on stdin with a
pickled timed run on stdout, until it reads None. A side imports its framework only when it is
built, so that neither framework's memory counts in the other's peak.
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import numpy as np

CONFIG = "configs/smollm2_135m.yaml"


def peak_rss_reset() -> None:
  """Restarts the kernel's count of this process's peak resident memory (VmHWM)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def peak_rss() -> int:
  with open("/proc/self/status") as f:
    kb = next(line.split()[1] for line in f if line.startswith("VmHWM"))
  return int(kb) * 1024


class TransformersSide:
  """`AutoModelForCausalLM` on the GGUF file, float32, greedy `generate` with EOS off."""

  def __init__(self, path: str):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    self.torch, self.transformers = torch, transformers
    folder, name = os.path.split(path)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    self.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads()}

  def run(self, prompts_BxT: np.ndarray, gen_len: int) -> dict:
    """`generate` timed by a logits processor: its first call ends prefill, its last decode."""
    stamps = []

    def stamp(_input_ids, scores):
      stamps.append(time.perf_counter())
      return scores

    config = self.transformers.GenerationConfig(max_new_tokens=gen_len, do_sample=False,
                                                eos_token_id=None, pad_token_id=0)
    tokens = self.torch.as_tensor(prompts_BxT, dtype=self.torch.long)
    t0 = time.perf_counter()
    with self.torch.inference_mode():
      out = self.model.generate(tokens, attention_mask=self.torch.ones_like(tokens),
                                generation_config=config,
                                logits_processor=self.transformers.LogitsProcessorList([stamp]))
    return {"prefill_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0],
            "tokens": out[:, prompts_BxT.shape[1]:].numpy()}


class KvjaxSide:
  """kvjax's prefill and decode loop (`kvjax.decode.throughput.timed_generation`) on
  `configs/smollm2_135m.yaml` with `overrides`."""

  def __init__(self, *overrides: str):
    import jax  # noqa: PLC0415

    import kvjax  # noqa: PLC0415
    from kvjax.decode.throughput import timed_generation  # noqa: PLC0415
    from kvjax.io import load_weights  # noqa: PLC0415
    from kvjax.layers.cache import tree_nbytes  # noqa: PLC0415

    self.cfg = kvjax.load_config(CONFIG, overrides).model
    self.model = kvjax.build_model(self.cfg)
    self.params = load_weights(self.cfg)
    self.timed_generation = timed_generation
    self.param_bytes = tree_nbytes(self.params)
    self.versions = {"jax": jax.__version__, "dtype": self.cfg.dtype,
                     "param_dtype": self.cfg.param_dtype, "cache_dtype": self.cfg.cache_dtype}

  def run(self, prompts_BxT: np.ndarray, gen_len: int) -> dict:
    run = self.timed_generation(self.model, self.params, self.cfg, prompts_BxT, gen_len=gen_len)
    # A decode step reads every weight (the tied head the whole table) and the whole dense
    # cache (attention masks the slots not written yet).
    return {"prefill_s": run.prefill_s, "decode_s": run.decode_s,
            "tokens": np.asarray(run.state.tokens), "param_bytes": self.param_bytes,
            "kv_cache_bytes": run.kv_cache_bytes}


SIDES = {"transformers": TransformersSide, "kvjax": KvjaxSide}


def main() -> None:
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what the libraries print goes to stderr
  side = SIDES[sys.argv[1]](*sys.argv[2:])
  pickle.dump(side.versions, replies)
  replies.flush()
  while (request := pickle.load(sys.stdin.buffer)) is not None:
    peak_rss_reset()
    result = side.run(*request)
    pickle.dump({**result, "peak_rss_bytes": peak_rss()}, replies)
    replies.flush()


if __name__ == "__main__":
  main()
