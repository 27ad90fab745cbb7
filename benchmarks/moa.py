"""MoA's claim on SmolLM2-135M-Instruct: at equal KV-cache density, per-head elastic windows
keep long-context retrieval near dense while uniform windows (StreamingLLM) collapse; H2O
eviction at the same cache size is the other baseline.

  python -m benchmarks.moa                                   # the full run (hours on CPU)
  python -m benchmarks.moa --lengths 512 1024 2048 --samples 1 --profile-lengths 512 1024 \
      --profile-samples 2 --sinks 64                          # what fits about an hour on 2 cores

Every number comes from the project's CLIs, run as subprocesses and recorded with their
commands: plans from `python -m kvjax.moa`, retrieval and perplexity from `python -m kvjax.eval`,
KV bytes and decode tokens/s from `decode.py`. A plan already in the work folder is reused and
its search report recorded. Perplexity (`kvjax.eval`) is teacher-forced under each method's
prefill masks, which H2O does not have (it evicts after a dense prefill), so H2O gets none there;
the continuation loss, measured in this process, is what every method has: held-out windows are
prefilled through the method's cache (`init_cache`, `prefill`) and their next
tokens decoded one at a time, teacher-forced. `--resume` reuses the results of commands already
run with the same arguments. Results:
benchmarks/results/moa_<device>.json and .png (retrieval accuracy by context length, per method
and density).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from benchmarks.common import RESULTS, save_plot, write_json
from kvjax.decode import SamplingConfig, decode_step, init_cache, prefill

CONFIG = "configs/smollm2_135m.yaml"
TASKS = ("passkey", "lines", "perplexity", "decode")
ROOT = Path(__file__).resolve().parent.parent


def _with_out(cmd: list[str], out: Path | None) -> list[str]:
  return [*cmd, "--json", str(out)] if out is not None and "--out" not in cmd else cmd


def _saved(out: Path) -> Path:
  return out.with_name(f"{out.stem}.record.json")


def saved_record(cmd: list[str], out: Path) -> dict | None:
  """The record `run` kept for this exact command, if any."""
  saved = _saved(out)
  if not saved.exists():
    return None
  record = json.loads(saved.read_text())
  command = shlex.join(_with_out(cmd, out)).replace(sys.executable, "python")
  return record if record["command"] == command else None


def run(cmd: list[str], out: Path | None = None, resume: bool = False) -> dict:
  """Runs one CLI command; returns its command line, wall time and JSON output, also kept beside
  the output (`resume` reuses that record when the command is the same). The commands share a
  persistent compilation cache (the same shapes recur from task to task)."""
  if resume and out is not None and (record := saved_record(cmd, out)):
    return record
  cmd = _with_out(cmd, out)
  command = shlex.join(cmd).replace(sys.executable, "python")
  print(f"$ {shlex.join(cmd)}", flush=True)
  env = {"JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "kvjax-jax-cache"),
         **os.environ}
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, env=env)
  record = {"command": command, "wall_s": round(time.perf_counter() - start, 1)}
  if out is not None and out.suffix == ".json" and out.exists():
    record["result"] = json.loads(out.read_text())
    _saved(out).write_text(json.dumps(record, indent=2))
  return record


def plans(args, work: Path) -> dict[str, dict]:
  """method name -> {"overrides": [...], "record": ...} for every method and density."""
  methods = {"dense": {"overrides": [], "density": 1.0}}
  for d in args.densities:
    moa = work / f"moa_{d:g}.json"
    if moa.exists():
      report = Path(f"{moa}.report.json")
      methods[f"moa_{d:g}_search"] = {"record": {
          "reused": str(moa.relative_to(ROOT)),
          "report": json.loads(report.read_text()) if report.exists() else None}}
    else:
      methods[f"moa_{d:g}_search"] = {"record": run([
          sys.executable, "-m", "kvjax.moa", "plan", "--config", CONFIG, "--out", str(moa),
          "--density", str(d), "--lengths", *map(str, args.profile_lengths),
          "--samples", str(args.profile_samples), "--val-samples", "1",
          "--alphas", *map(str, args.alphas), "--betas", "0", "1", "0.125"])}
    methods[f"moa_{d:g}"] = {"overrides": [f"model.moa.plan={moa}"], "density": d}
    stream = work / f"streaming_{d:g}.json"
    run([sys.executable, "-m", "kvjax.moa", "uniform", "--config", CONFIG, "--beta", str(d),
         "--out", str(stream)])
    for sinks in args.sinks:
      methods[f"streaming{sinks}_{d:g}"] = {
          "overrides": [f"model.moa.plan={stream}", f"model.moa.sink_tokens={sinks}"],
          "density": d}
    methods[f"h2o_{d:g}"] = {
        "overrides": ["model.eviction.policy=h2o", f"model.eviction.keep_ratio={d:g}"],
        "density": d}
  return methods


def evaluate(args, name: str, overrides: list[str], work: Path) -> dict:
  ev = [sys.executable, "-m", "kvjax.eval", "--config", CONFIG]
  long = ["--lengths", *map(str, args.lengths), "--depths", *map(str, args.depths),
          "--samples", str(args.samples)]
  evicts = any(o.startswith("model.eviction.policy=") for o in overrides)
  text = heldout_text(args, work)
  commands = {
      "passkey": [*ev, "--task", "passkey", *long],
      "lines": [*ev, "--task", "lines", *long],
      "perplexity": None if evicts else [*ev, "--task", "perplexity", "--text", str(text),
                                         "--seq-len", str(args.ppl_seq_len)],
      "decode": [sys.executable, "decode.py", "--config", CONFIG, "--batch", "1",
                 "--prompt-len", str(args.decode_prompt), "--gen-len", "32"],
  }
  files = {"passkey": "passkey", "lines": "lines", "perplexity": "ppl", "decode": "decode"}
  results = {}
  for task, cmd in commands.items():
    out = work / f"{name}_{files[task]}.json"
    if cmd is None:
      results[task] = None
    elif task in args.tasks:
      results[task] = run([*cmd, *overrides], out, args.resume)
    else:  # not run now; what an earlier pass measured still belongs in the summary
      results[task] = saved_record([*cmd, *overrides], out) if args.resume else None
  return results


def heldout_text(args, work: Path) -> Path:
  """The first `--ppl-chars` characters of the config's validation documents, as a file."""
  from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415

  data = kvjax.load_config(ROOT / CONFIG).data
  path = work / f"heldout_{args.ppl_chars}.txt"
  if not path.exists():
    docs = split_documents(load_documents(data.source), data.val_fraction)[1]
    path.write_text("\n".join(docs)[:args.ppl_chars], encoding="utf-8")
  return path


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_nll(model, params, cache, tokens_BxR, start):
  """Mean loss of tokens 1.. of `tokens_BxR` (positions start + 1 ..), one decode step each."""
  def body(cache, x):
    tok_B, pos = x
    logits_BxV, cache = decode_step(model, params, tok_B, jnp.full(tok_B.shape, pos), cache)
    return cache, jax.nn.log_softmax(logits_BxV)

  r = tokens_BxR.shape[1]
  _, logp_RxBxV = jax.lax.scan(body, cache, (tokens_BxR[:, :-1].T, start + jnp.arange(r - 1)))
  logp_RxB = jnp.take_along_axis(logp_RxBxV, tokens_BxR[:, 1:].T[..., None], axis=-1)[..., 0]
  return -logp_RxB.mean()


def continuation(args, methods: dict, work: Path) -> dict:
  """Per method: loss and perplexity of `--cont-tokens - 1` held-out tokens after a
  `--cont-context`-token prefix, through the method's cache. Kept in the work folder per
  setting; `--resume` reuses a method measured there with the same overrides."""
  from kvjax.data.corpus import load_documents, split_documents  # noqa: PLC0415
  from kvjax.io import load_weights, tokenizer_for  # noqa: PLC0415

  base = kvjax.load_config(ROOT / CONFIG)
  params, tokenizer = load_weights(base.model), tokenizer_for(base)
  text = "\n".join(split_documents(load_documents(base.data.source), base.data.val_fraction)[1])
  ids = np.asarray(tokenizer.encode(text), np.int32)
  c, r, b = args.cont_context, args.cont_tokens, args.cont_windows
  width = c + r
  if len(ids) < b * width:
    raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {b} x {width}")
  windows_BxW = ids[:b * width].reshape(b, width)
  path = work / f"continuation_{c}_{r}_{b}.json"
  out = json.loads(path.read_text()) if args.resume and path.exists() else {}
  for name, spec in methods.items():
    if out.get(name, {}).get("overrides") == spec["overrides"]:
      continue
    cfg = kvjax.load_config(ROOT / CONFIG, spec["overrides"]).model
    model = kvjax.build_model(cfg)
    start = time.perf_counter()
    state = prefill(model, params, jnp.asarray(windows_BxW[:, :c]), jnp.full((b,), c, jnp.int32),
                    init_cache(cfg, b, width), jax.random.key(0), sampling=SamplingConfig(),
                    max_new_tokens=r)
    nbytes = state.cache.nbytes
    nll = float(_teacher_forced_nll(model, params, state.cache, jnp.asarray(windows_BxW[:, c:]),
                                    c))
    out[name] = {"overrides": spec["overrides"], "nll_per_token": nll,
                 "perplexity": float(np.exp(nll)),
                 "tokens": b * (r - 1), "kv_cache_bytes_after_prefill": nbytes,
                 "wall_s": round(time.perf_counter() - start, 1)}
    print(f"continuation {name}: nll {nll:.4f}, kv bytes {nbytes}", flush=True)
    path.write_text(json.dumps(out, indent=2))
  return {name: out[name] for name in methods}


def plot(summary: dict) -> None:
  """Passkey accuracy by context length and by depth, and line retrieval where measured."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  panels = (("passkey", "by_length", "context tokens"), ("passkey", "by_depth", "depth of the key"),
            ("lines", "by_length", "context tokens"))
  for ax, (task, key, xlabel) in zip(axes, panels):
    for name, rec in summary["methods"].items():
      if not rec["eval"][task]:
        continue
      table = rec["eval"][task]["result"]["result"][key]
      xs = sorted(table, key=float)
      ax.plot([float(x) for x in xs], [table[x]["accuracy"] for x in xs], marker="o", label=name,
              linestyle="-" if name.startswith(("dense", "moa")) else "--")
    ax.set(title=f"{task} accuracy {key.replace('_', ' ')}", xlabel=xlabel, ylabel="accuracy",
           ylim=(-0.05, 1.05))
  axes[0].legend(fontsize=7)
  save_plot(fig, "moa")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
  p.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
  p.add_argument("--samples", type=int, default=2)
  p.add_argument("--profile-lengths", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--profile-samples", type=int, default=4)
  p.add_argument("--alphas", type=int, nargs=3, default=[-512, 2048, 256])
  p.add_argument("--sinks", type=int, nargs="+", default=[4, 64])
  p.add_argument("--ppl-seq-len", type=int, default=1024)
  p.add_argument("--ppl-chars", type=int, default=20_000, help="held-out text for perplexity")
  p.add_argument("--decode-prompt", type=int, default=2048)
  p.add_argument("--cont-context", type=int, default=1024)
  p.add_argument("--cont-tokens", type=int, default=65)
  p.add_argument("--cont-windows", type=int, default=4)
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                 help="CLI measurements to run; with --resume the summary also keeps the "
                      "others' earlier results")
  p.add_argument("--resume", action="store_true",
                 help="reuse CLI results and continuation losses already in the work folder")
  args = p.parse_args()
  work = RESULTS / "moa"
  work.mkdir(parents=True, exist_ok=True)
  summary = {"config": CONFIG, "args": vars(args), "methods": {}}
  methods = plans(args, work)
  for name, spec in methods.items():
    if "overrides" not in spec:
      summary[name] = spec["record"]
      continue
    summary["methods"][name] = {"density": spec["density"], "overrides": spec["overrides"],
                                "eval": evaluate(args, name, spec["overrides"], work)}
    write_json("moa", summary)
  summary["continuation"] = continuation(
      args, {n: s for n, s in methods.items() if "overrides" in s}, work)
  write_json("moa", summary)
  plot(summary)


if __name__ == "__main__":
  main()
