"""MoE benchmark suite: every figure is a ratio of two timings taken in the same run, after
compile and warm-up, median of interleaved repeats (these machines are shared and noisy).

  python scripts/benchmark.py --quick             # < 5 minutes on a 2-core CPU, prints the table
  python scripts/benchmark.py --out benchmarks    # the full suite: JSON, Markdown table, plots

Suites:
  layer   MoE layer fwd+bwd time / dense FFN with the same active FLOPs per token (top-1), per
          dispatch strategy, over experts E, group size S and capacity factor cf; the einsum
          strategy's FLOP floor cf·(1 + S/h) × dense and how close it gets.
  memory  peak temporary memory of the layer's fwd+bwd (XLA compiled memory analysis) vs tokens
          at a fixed group size, and vs group size at fixed tokens.
  hf      the same MoE layer in HF transformers (SwitchTransformersSparseMLP, PyTorch CPU) on
          identical shapes and weights: time ratio, and HF's own MoE / dense ratio.
  train   training-step tokens/s: switch_tiny / t5_tiny (equal FLOPs per token).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from moe_jax import moe_layer, routing


def interleaved_median(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each fn, after one warm-up call each; calls alternate so that
  machine load drifts hit every fn alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def moe_fwd_bwd(num_experts: int, d_model: int, d_ff: int, tokens: int, group_size: int,
                cf: float, dispatch: str, seq_len: int = 512):
  """Jitted fwd+bwd of a top-1 MoeLayer on [tokens/seq_len, seq_len, m] inputs, its args."""
  layer = moe_layer.MoeLayer(
      num_experts=num_experts, d_ff=d_ff, router=routing.TokensChooseRouter(num_experts),
      train_capacity_factor=cf, group_size=group_size, dispatch=dispatch)
  x = jax.random.normal(jax.random.key(0), (tokens // seq_len, seq_len, d_model))
  params = nn.unbox(layer.init({"params": jax.random.key(1)}, x, deterministic=True)["params"])

  def loss(p, x):
    y = layer.apply({"params": p}, x, deterministic=False, rngs={"router": jax.random.key(2)})
    return jnp.mean(y ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def dense_fwd_bwd(d_model: int, d_ff: int, tokens: int, seq_len: int = 512):
  """Jitted fwd+bwd of a dense relu FFN with the MoE layer's active FLOPs per token (top-1)."""
  k = jax.random.split(jax.random.key(3), 3)
  wi = jax.random.normal(k[0], (d_model, d_ff)) * d_model ** -0.5
  wo = jax.random.normal(k[1], (d_ff, d_model)) * d_ff ** -0.5
  x = jax.random.normal(k[2], (tokens // seq_len, seq_len, d_model))

  def loss(p, x):
    return jnp.mean((jax.nn.relu(x @ p[0]) @ p[1]) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), ((wi, wo), x)


def layer_suite(grid: dict, repeats: int) -> list[dict]:
  m, h, tokens = grid["d_model"], grid["d_ff"], grid["tokens"]
  dense, dargs = dense_fwd_bwd(m, h, tokens)
  configs = [(e, s, cf, d) for e in grid["experts"] for d in grid["strategies"]
             for s in grid["group_sizes"] for cf in grid["capacity_factors"]
             # dropless has no capacity: one group size and cf per E is enough; on CPU its
             # ragged_dot costs ~E dense matmuls, so large E is left out there.
             if d != "dropless" or (s == grid["group_sizes"][0] and cf == grid["capacity_factors"][0]
                                    and e <= grid["dropless_max_experts"])]
  rows = []
  for e, s, cf, d in tqdm.tqdm(configs, desc="layer", file=sys.stdout):
    fn, args = moe_fwd_bwd(e, m, h, tokens, s, cf, d)
    t = interleaved_median({"moe": lambda: fn(*args), "dense": lambda: dense(*dargs)}, repeats)
    floor = cf * (1 + s / h) if d == "einsum" else None
    ratio = t["moe"] / t["dense"]
    rows.append({"experts": e, "group_size": s, "capacity_factor": cf, "dispatch": d,
                 "moe_ms": 1e3 * t["moe"], "dense_ms": 1e3 * t["dense"], "ratio": ratio,
                 "einsum_floor": floor, "vs_floor": ratio / floor if floor else None})
  return rows


def memory_suite(grid: dict) -> list[dict]:
  """Compiled temp bytes of the layer's fwd+bwd (einsum), no execution needed."""
  m, h = grid["d_model"], grid["d_ff"]
  rows = []
  cases = [("tokens", t, grid["memory_group_size"]) for t in grid["memory_tokens"]]
  cases += [("group_size", grid["memory_fixed_tokens"], s) for s in grid["memory_group_sizes"]]
  for sweep, tokens, s in tqdm.tqdm(cases, desc="memory", file=sys.stdout):
    fn, args = moe_fwd_bwd(8, m, h, tokens, s, 1.25, "einsum")
    stats = fn.lower(*args).compile().memory_analysis()
    rows.append({"sweep": sweep, "tokens": tokens, "group_size": s,
                 "temp_bytes": int(stats.temp_size_in_bytes)})
  return rows


def hf_suite(grid: dict, repeats: int) -> list[dict]:
  """moe_jax (einsum and the best strategy) vs HF SwitchTransformersSparseMLP, same weights."""
  import torch
  from transformers import SwitchTransformersConfig
  from transformers.models.switch_transformers import modeling_switch_transformers as hf

  torch.set_num_threads(os.cpu_count() or 1)
  m, h, tokens, seq = grid["d_model"], grid["d_ff"], grid["tokens"], grid["hf_seq_len"]
  rows = []
  for e in tqdm.tqdm(grid["hf_experts"], desc="hf", file=sys.stdout):
    # HF routes each sequence as one group: capacity = ceil(cf · seq / E).
    cf = 1.25
    cap = routing.expert_capacity(seq, e, cf)
    config = SwitchTransformersConfig(d_model=m, d_ff=h, num_experts=e, expert_capacity=cap,
                                      router_jitter_noise=0.0, dropout_rate=0.0)
    torch_moe, torch_dense = hf.SwitchTransformersSparseMLP(config), hf.SwitchTransformersDenseActDense(config)
    x_np = np.random.default_rng(0).normal(size=(tokens // seq, seq, m)).astype(np.float32)
    x_t = torch.tensor(x_np, requires_grad=True)

    def torch_step(module):
      module.zero_grad(set_to_none=True)
      x_t.grad = None
      module(x_t).pow(2).mean().backward()

    timings = {}
    for d in ("einsum", "indices", "dropless"):
      layer = moe_layer.MoeLayer(num_experts=e, d_ff=h, router=routing.TokensChooseRouter(e),
                                 train_capacity_factor=cf, group_size=seq, dispatch=d)
      x = jnp.asarray(x_np)
      params = nn.unbox(layer.init({"params": jax.random.key(1)}, x, deterministic=True)["params"])
      if d == "einsum":  # identical weights in both frameworks
        sd = {"router.classifier.weight": np.asarray(params["router"]["w"]).T}
        for j in range(e):
          sd[f"experts.expert_{j}.wi.weight"] = np.asarray(params["wi"][j]).T
          sd[f"experts.expert_{j}.wo.weight"] = np.asarray(params["wo"][j]).T
        torch_moe.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
      fn = jax.jit(jax.grad(lambda p, x, layer=layer: jnp.mean(
          layer.apply({"params": p}, x, deterministic=True) ** 2), argnums=(0, 1)))
      timings[d] = (fn, params, x)
    t = interleaved_median({
        **{d: (lambda f=f, p=p, x=x: f(p, x)) for d, (f, p, x) in timings.items()},
        "hf_moe": lambda: torch_step(torch_moe), "hf_dense": lambda: torch_step(torch_dense)},
        repeats)
    best = min(("einsum", "indices", "dropless"), key=t.get)
    rows.append({"experts": e, "tokens": tokens, "seq_len": seq, "capacity": cap,
                 **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                 "hf_moe_over_hf_dense": t["hf_moe"] / t["hf_dense"],
                 "einsum_over_hf": t["einsum"] / t["hf_moe"], "best": best,
                 "best_over_hf": t[best] / t["hf_moe"]})
  return rows


def train_suite(grid: dict, repeats: int) -> list[dict]:
  """Training-step tokens/s of switch_tiny vs t5_tiny: the model's loss_fn, grad, Adafactor update."""
  import gin
  import optax

  from moe_jax import config, trainer

  batch, lengths = grid["train_batch"], grid["train_lengths"]
  steps = {}
  for name in ("switch_tiny", "t5_tiny"):
    # MoE layer factories are gin-bound and resolve when the module is set up, so init and
    # compile while this model's config is in force.
    model = config.build_model([f"models/{name}.gin"])
    shapes = {"encoder_input_tokens": (batch, lengths[0]), "decoder_input_tokens": (batch, lengths[1])}
    boxed = model.get_initial_variables(jax.random.key(0), shapes)["params"]
    params = nn.unbox(boxed)
    rng = np.random.default_rng(0)
    data = {"encoder_input_tokens": rng.integers(2, 500, shapes["encoder_input_tokens"]),
            "decoder_input_tokens": rng.integers(2, 500, shapes["decoder_input_tokens"]),
            "decoder_target_tokens": rng.integers(2, 500, shapes["decoder_input_tokens"]),
            "decoder_loss_weights": np.ones(shapes["decoder_input_tokens"])}
    data = {k: jnp.asarray(v, jnp.float32 if "weights" in k else jnp.int32) for k, v in data.items()}
    opt = optax.chain(trainer.adafactor(nn.get_partition_spec(boxed)), optax.scale(1e-3))
    state = (params, opt.init(params))

    def step(state, batch, model=model, opt=opt):
      p, o = state
      grads, _ = jax.grad(model.loss_fn, has_aux=True)(p, batch, jax.random.key(1))
      updates, o = opt.update(grads, o, p)
      return optax.apply_updates(p, updates), o
    steps[name] = (jax.jit(step).lower(state, data).compile(), state, data)
    gin.clear_config()
  t = interleaved_median({k: (lambda s=s: s[0](s[1], s[2])) for k, s in steps.items()}, repeats)
  tokens = batch * sum(lengths)
  return [{"model": k, "step_ms": 1e3 * v, "tokens_per_s": tokens / v} for k, v in t.items()] + [
      {"model": "switch_tiny / t5_tiny", "tokens_per_s_ratio": t["t5_tiny"] / t["switch_tiny"]}]


FULL = {"tokens": 4096, "d_model": 512, "d_ff": 2048, "experts": [8, 32, 128],
        "group_sizes": [256, 1024, 4096], "capacity_factors": [1.0, 1.25, 2.0],
        "strategies": ["einsum", "indices", "dropless"], "repeats": 4,
        "dropless_max_experts": 32 if jax.default_backend() == "cpu" else 128,
        "memory_tokens": [2048, 4096, 8192, 16384], "memory_group_size": 1024,
        "memory_fixed_tokens": 8192, "memory_group_sizes": [256, 1024, 4096, 8192],
        "hf_experts": [8, 32], "hf_seq_len": 512, "train_batch": 8, "train_lengths": [128, 64]}
QUICK = {**FULL, "tokens": 2048, "d_model": 256, "d_ff": 1024, "experts": [8, 32],
         "group_sizes": [256, 1024], "capacity_factors": [1.25], "repeats": 3,
         "memory_tokens": [1024, 2048, 4096], "memory_fixed_tokens": 4096,
         "memory_group_sizes": [256, 1024, 4096], "hf_experts": [8], "train_batch": 4,
         "train_lengths": [64, 32]}


def markdown(results: dict) -> str:
  env = results["environment"]
  out = [f"# moe_jax benchmarks ({'quick' if results['quick'] else 'full'})", "",
         f"{env['backend']} · {env['device']} · {env['cpus']} CPUs · jax {env['jax']} · "
         f"command: `{results['command']}`", "",
         f"Layer: top-1, {results['grid']['tokens']} tokens, m={results['grid']['d_model']}, "
         f"h={results['grid']['d_ff']}; ratio = MoE fwd+bwd / dense FFN fwd+bwd (same active "
         "FLOPs per token), same run, median of interleaved repeats. floor = cf·(1 + S/h) "
         "(einsum's dispatch+combine FLOPs); vs floor = ratio / floor.", "",
         "| E | group S | cf | dispatch | MoE ms | dense ms | ratio | einsum floor | vs floor |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in results.get("layer", []):
    fl = f"{r['einsum_floor']:.2f}" if r["einsum_floor"] else ""
    vf = f"{r['vs_floor']:.2f}" if r["vs_floor"] else ""
    out.append(f"| {r['experts']} | {r['group_size']} | {r['capacity_factor']} | {r['dispatch']} | "
               f"{r['moe_ms']:.1f} | {r['dense_ms']:.1f} | **{r['ratio']:.2f}** | {fl} | {vf} |")
  if results.get("memory"):
    out += ["", "Peak temporary memory of fwd+bwd (einsum, E=8, cf 1.25, XLA memory analysis):", "",
            "| sweep | tokens | group S | temp MiB | MiB per 1k tokens |", "|---|---|---|---|---|"]
    for r in results["memory"]:
      mib = r["temp_bytes"] / 2**20
      out.append(f"| {r['sweep']} | {r['tokens']} | {r['group_size']} | {mib:.1f} | "
                 f"{mib / r['tokens'] * 1000:.2f} |")
  if results.get("hf"):
    out += ["", "Against HF transformers SwitchTransformersSparseMLP (PyTorch CPU), same weights, "
            "fwd+bwd, groups = sequences:", "",
            "| E | tokens | C | HF MoE ms | HF MoE / HF dense | einsum / HF | best | best / HF |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["hf"]:
      out.append(f"| {r['experts']} | {r['tokens']} | {r['capacity']} | {r['hf_moe_ms']:.1f} | "
                 f"{r['hf_moe_over_hf_dense']:.2f} | {r['einsum_over_hf']:.2f} | {r['best']} | "
                 f"**{r['best_over_hf']:.2f}** |")
  if results.get("train"):
    out += ["", "Training step (Adafactor, fwd+bwd+update):", "", "| model | step ms | tokens/s |",
            "|---|---|---|"]
    for r in results["train"]:
      if "tokens_per_s" in r:
        out.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} |")
      else:
        out.append(f"| {r['model']} | | **{r['tokens_per_s_ratio']:.2f}** |")
  return "\n".join(out) + "\n"


def plots(results: dict, out: pathlib.Path) -> None:
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  layer = results.get("layer", [])
  cf_plot = 1.25 if any(r["capacity_factor"] == 1.25 for r in layer) else None
  for d, marker in (("einsum", "o"), ("indices", "s")):
    for e in sorted({r["experts"] for r in layer}):
      pts = [(r["group_size"], r["ratio"]) for r in layer
             if r["dispatch"] == d and r["experts"] == e and r["capacity_factor"] == cf_plot]
      if pts:
        axes[0].plot(*zip(*sorted(pts)), marker=marker, label=f"{d} E={e}")
  sizes = sorted({r["group_size"] for r in layer})
  for r in layer:
    if r["dispatch"] == "dropless":
      axes[0].axhline(r["ratio"], ls=":", color="gray")
      axes[0].text(sizes[0], r["ratio"] * 1.05, f"dropless E={r['experts']} (ragged_dot)", fontsize=7)
  axes[0].axhline(1.0, color="k", lw=0.8)
  axes[0].set(xscale="log", yscale="log", xlabel="group size S", ylabel="MoE / dense fwd+bwd time",
              title=f"MoE layer vs dense FFN (top-1, cf {cf_plot})")
  axes[0].set_xticks(sizes, [str(v) for v in sizes], minor=False)
  axes[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  axes[0].legend(fontsize=7)
  for sweep in ("tokens", "group_size"):
    pts = [(r[sweep], r["temp_bytes"] / 2**20) for r in results.get("memory", []) if r["sweep"] == sweep]
    if pts:
      axes[1].plot(*zip(*pts), marker="o", label=f"vs {sweep}")
  axes[1].set(xscale="log", yscale="log", xlabel="tokens or group size",
              ylabel="temp memory (MiB)", title="Peak memory: linear in tokens at fixed S")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(out / "benchmark.png", dpi=110)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small grid, < 5 minutes on 2 CPUs")
  parser.add_argument("--suites", default="layer,memory,hf,train")
  parser.add_argument("--out", default=None, help="directory for results.json, RESULTS.md, plots")
  args = parser.parse_args(argv)
  suites = args.suites.split(",")
  unknown = set(suites) - {"layer", "memory", "hf", "train"}
  if unknown:
    parser.error(f"--suites has unknown {sorted(unknown)}")
  grid = QUICK if args.quick else FULL
  dev = jax.devices()[0]
  results = {"quick": args.quick, "grid": grid,
             "command": "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "environment": {"backend": jax.default_backend(), "device": dev.device_kind,
                             "cpus": os.cpu_count(), "jax": jax.__version__,
                             "machine": platform.machine()}}
  out = pathlib.Path(args.out) if args.out else None
  runners = {"layer": lambda: layer_suite(grid, grid["repeats"]), "memory": lambda: memory_suite(grid),
             "hf": lambda: hf_suite(grid, grid["repeats"]), "train": lambda: train_suite(grid, grid["repeats"])}
  for suite in suites:
    results[suite] = runners[suite]()
    if out:  # after every suite, so a long run that fails late keeps what it measured
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(results, indent=1))
      (out / "RESULTS.md").write_text(markdown(results))
  print(markdown(results))
  if out:
    plots(results, out)
    print(f"wrote {out}/results.json, RESULTS.md, benchmark.png")


if __name__ == "__main__":
  main()
