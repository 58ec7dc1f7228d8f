"""MoE benchmark suite: every figure is a ratio of two timings taken in the same run, after
compile and warm-up. Functions are timed in blocks (each one untimed call, then `calls` timed
calls in a row), in several alternating rounds, median over rounds: interleaving single calls
would charge one function for the temporaries the previous one left behind.

  python scripts/benchmark.py --quick             # a few minutes on a 2-core CPU, prints the table
  python scripts/benchmark.py --out benchmarks    # the full suite: JSON, Markdown table, plots

Suites:
  layer   MoE layer fwd+bwd time / the dense FFN with the same active FLOPs per token (top-1),
          tokens as one 2-D [T,m] matrix (its fastest form), per dispatch strategy, over experts
          E, group size S and capacity factor cf. The dense FFN's GFLOP/s is printed next to the
          machine's GEMM peak (one plain 2-D matmul of the same size).
  ops     where the layer's time goes (fwd+bwd, S=1024, cf 1.25): router, expert matmuls, and
          dispatch + combine (the rest), with GFLOP/s of the first two.
  memory  peak temporary memory of the layer's fwd+bwd (XLA compiled memory analysis) vs tokens
          at a fixed group size, and vs group size at fixed tokens; dropless vs tokens.
  hf      the same MoE layer in HF transformers (SwitchTransformersSparseMLP, PyTorch CPU) on
          identical shapes and weights, with flaxformer's recorded figures for reference.
  train   training tokens/s of switch_tiny / t5_tiny and switch_mini / t5_mini (equal FLOPs
          per token) in the trainer's own step, at the pretrain run's batch and lengths.
  mfu     model FLOPs utilization of the trainer's step (moe_jax.flops / step time / the chip's
          bf16 peak from its data sheet, or --peak_tflops), and the fraction of a GEMM measured
          in the same run: Switch-Base-8 per strategy and T5-Base on a GPU or TPU
          (`--grid accelerator`), the tiny pair on CPU.

Grids: `full` (default) and `quick` for the CPU; `accelerator` for one GPU or TPU chip
(bfloat16, 32,768 tokens per layer call, the grouped matmul of dropless both ways, suites layer,
ops and mfu; a few minutes on an H100/H200 once compiled).

A grid is an entry of GRIDS (the JSON's "grid"); a suite is an entry of SUITES: its measurement
(grid -> the JSON's rows), its RESULTS.md section and its panel of benchmark.png, if any.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from moe_jax import dispatch as dispatch_lib
from moe_jax import moe_layer, routing

# Grids: the sizes the suites run at, one flat dict each (the JSON's "grid", as written). FULL:
# the 2-core CPU's full suite; QUICK: a reduced one in minutes; ACCELERATOR: one GPU or TPU chip.
FULL = {"tokens": 4096, "d_model": 512, "d_ff": 2048, "experts": [8, 32, 128],
        "group_sizes": [256, 1024, 4096], "capacity_factors": [1.0, 1.25, 2.0],
        "strategies": ["einsum", "indices", "dropless"], "calls": 3, "rounds": 3,
        "ops_experts": [8, 32], "ops_group_size": 1024,
        "memory_tokens": [2048, 4096, 8192, 16384], "memory_group_size": 1024,
        "memory_fixed_tokens": 8192, "memory_group_sizes": [256, 1024, 4096, 8192],
        "hf_experts": [8, 32], "hf_seq_len": 512, "train_batch": 32,
        "train_lengths": {"inputs": 64, "targets": 16}, "train_calls": 10,
        "train_pairs": [["switch_tiny", "t5_tiny"], ["switch_mini", "t5_mini"]],
        "dtype": "float32", "mfu_batch": 32, "mfu_lengths": {"inputs": 64, "targets": 16},
        "mfu_gemm_size": 2048,
        "mfu_models": [["switch_tiny", []], ["t5_tiny", []], ["switch_mini", []], ["t5_mini", []]],
        "suites": ["layer", "ops", "memory", "hf", "train", "mfu"]}
QUICK = {**FULL, "tokens": 2048, "d_model": 256, "d_ff": 1024, "experts": [8, 32],
         "group_sizes": [1024], "capacity_factors": [1.25], "calls": 2, "rounds": 2,
         "memory_tokens": [1024, 2048, 4096], "memory_fixed_tokens": 4096,
         "memory_group_sizes": [256, 1024, 4096], "hf_experts": [8], "train_batch": 8,
         "train_calls": 5, "train_pairs": [["switch_tiny", "t5_tiny"]], "mfu_batch": 8,
         "mfu_gemm_size": 1024, "mfu_models": [["switch_tiny", []], ["t5_tiny", []]]}
# One GPU or TPU chip: the layer targets at a batch that fills the chip (the CPU grid's 4,096
# tokens take ~0.1 ms there), dropless through both grouped matmuls, and the MFU of
# Switch-Base-8 (per strategy; its dense twin T5-Base) at the paper's sequence lengths.
ACCELERATOR = {**FULL, "tokens": 32768, "experts": [8, 32], "group_sizes": [1024, 4096],
               "capacity_factors": [1.25],
               "strategies": ["einsum", "indices", "dropless", "dropless:windows"],
               "calls": 10, "rounds": 3, "dtype": "bfloat16", "train_calls": 5,
               "mfu_batch": 64, "mfu_lengths": {"inputs": 512, "targets": 114},
               "mfu_gemm_size": 8192,
               "mfu_models": [["switch_base_8", []],
                              ["switch_base_8", ["moe_layer.MoeLayer.dispatch = 'indices'"]],
                              ["switch_base_8", ["moe_layer.MoeLayer.dispatch = 'dropless'"]],
                              ["switch_base_8", ["moe_layer.MoeLayer.dispatch = 'dropless'",
                                                 "moe_layer.MoeLayer.grouped_matmul = 'windows'"]],
                              ["t5_base", []]],
               "suites": ["layer", "ops", "mfu"]}
GRIDS = {"full": FULL, "quick": QUICK, "accelerator": ACCELERATOR}

# flaxformer's MoeLayer (built from its sources on jax 0.10.2; it is not installable here), fwd+bwd
# ms on the idle 2-core CPU, 4096 tokens, m=512, h=2048, top-1, cf 1.25, groups of 1024, with
# HF's SparseMLP (groups = sequences of 512) timed in the same run. Compared through HF, the
# reference both runs share: flaxformer / HF there vs moe_jax / HF here.
FLAXFORMER_RECORDED = {8: {"scatter_ms": 408.0, "masked_ms": 570.0, "hf_ms": 320.0},
                       32: {"scatter_ms": 496.0, "masked_ms": 687.0, "hf_ms": 390.0}}
# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets: MFU's denominator. A
# device kind takes the longest name it contains ('NVIDIA H100 PCIe' -> 'H100 PCIe').
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}


# ---- timing ---------------------------------------------------------------------------------


def timed_blocks(fns: dict[str, Callable[[], object]], calls: int, rounds: int
                 ) -> dict[str, float]:
  """Seconds per call of each fn: per round, each fn runs one untimed call and then `calls`
  timed calls in a row; the median over `rounds` alternating rounds."""
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      jax.block_until_ready(fn())
      t0 = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())
      times[k].append((time.perf_counter() - t0) / calls)
  return {k: statistics.median(v) for k, v in times.items()}


def strategy(name: str) -> tuple[str, str | None]:
  """A suite's strategy name -> (dispatch, grouped matmul): 'dropless:windows' names dropless
  with the 'windows' grouped matmul; a plain name leaves the backend's default."""
  dispatch, _, impl = name.partition(":")
  return dispatch, impl or None


def moe_fwd_bwd(num_experts: int, d_model: int, d_ff: int, tokens: int, group_size: int,
                cf: float, dispatch: str, seq_len: int = 512, dtype: str = "float32"):
  """Jitted fwd+bwd of a top-1 MoeLayer (dispatch: a `strategy` name; activations and expert
  matmuls in dtype, params float32) on [tokens/seq_len, seq_len, m] inputs, its args."""
  dispatch, impl = strategy(dispatch)
  layer = moe_layer.MoeLayer(
      num_experts=num_experts, d_ff=d_ff, router=routing.TokensChooseRouter(num_experts),
      train_capacity_factor=cf, group_size=group_size, dispatch=dispatch, grouped_matmul=impl,
      dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (tokens // seq_len, seq_len, d_model), dtype)
  params = nn.unbox(layer.init({"params": jax.random.key(1)}, x, deterministic=True)["params"])

  def loss(p, x):
    y = layer.apply({"params": p}, x, deterministic=False, rngs={"router": jax.random.key(2)})
    return jnp.mean(y ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def dense_fwd_bwd(d_model: int, d_ff: int, tokens: int, dtype: str = "float32"):
  """Jitted fwd+bwd of a dense relu FFN with the MoE layer's active FLOPs per token (top-1),
  tokens as one [T,m] matrix: 3 · 2 · 2·T·m·h FLOPs. Params float32, matmuls in dtype (as
  the MoE layer)."""
  k = jax.random.split(jax.random.key(3), 3)
  wi = jax.random.normal(k[0], (d_model, d_ff)) * d_model ** -0.5
  wo = jax.random.normal(k[1], (d_ff, d_model)) * d_ff ** -0.5
  x = jax.random.normal(k[2], (tokens, d_model), dtype)

  def loss(p, x):
    y = jax.nn.relu(x @ p[0].astype(dtype)) @ p[1].astype(dtype)
    return jnp.mean(y.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), ((wi, wo), x)


def gemm(d_model: int, d_ff: int, tokens: int, dtype: str = "float32"):
  """One plain 2-D matmul [T,m] @ [m,h] (2·T·m·h FLOPs): the machine's GEMM peak here."""
  k = jax.random.split(jax.random.key(4), 2)
  args = (jax.random.normal(k[0], (tokens, d_model), dtype),
          jax.random.normal(k[1], (d_model, d_ff), dtype))
  return jax.jit(jnp.matmul), args


def baselines(grid: dict) -> tuple[dict, Callable[[], object]]:
  """The dense FFN and GEMM peak (GFLOP/s), timed together; and the dense FFN's thunk."""
  m, h, tokens = grid["d_model"], grid["d_ff"], grid["tokens"]
  dense, dargs = dense_fwd_bwd(m, h, tokens, grid["dtype"])
  mm, margs = gemm(m, h, tokens, grid["dtype"])
  t = timed_blocks({"dense": lambda: dense(*dargs), "gemm": lambda: mm(*margs)},
                   grid["calls"], grid["rounds"])
  flops = 2 * tokens * m * h
  return ({"dense_ms": 1e3 * t["dense"], "dense_gflops": 6 * flops / t["dense"] / 1e9,
           "gemm_ms": 1e3 * t["gemm"], "gemm_gflops": flops / t["gemm"] / 1e9},
          lambda: dense(*dargs))


# ---- the suites: each one's measurement, RESULTS.md section and plot panel ------------------


def layer_suite(grid: dict) -> dict:
  m, h, tokens = grid["d_model"], grid["d_ff"], grid["tokens"]
  base, dense = baselines(grid)
  configs = [(e, s, cf, d) for e in grid["experts"] for d in grid["strategies"]
             for s in grid["group_sizes"] for cf in grid["capacity_factors"]
             # dropless has no capacity and routes each group without one: one row per E
             if strategy(d)[0] != "dropless" or (s == grid["ops_group_size"] and cf == 1.25)]
  rows = []
  for e, s, cf, d in tqdm.tqdm(configs, desc="layer", file=sys.stdout):
    fn, args = moe_fwd_bwd(e, m, h, tokens, s, cf, d, dtype=grid["dtype"])
    t = timed_blocks({"moe": lambda: fn(*args), "dense": dense}, grid["calls"], grid["rounds"])
    rows.append({"experts": e, "group_size": s, "capacity_factor": cf, "dispatch": d,
                 "moe_ms": 1e3 * t["moe"], "dense_ms": 1e3 * t["dense"],
                 "ratio": t["moe"] / t["dense"]})
    if strategy(d)[0] == "dropless":  # how the backend lowered the grouped matmuls
      rows[-1]["custom_calls"] = custom_calls(fn.lower(*args).compile().as_text())
  return {"baseline": base, "rows": rows}


def custom_calls(hlo: str) -> list[str]:
  """The custom-call targets in compiled HLO text: which library kernels (cuDNN, cuBLAS,
  Pallas) the backend chose, e.g. whether ragged_dot became a grouped GEMM."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def _layer_section(layer: dict, grid: dict) -> list[str]:
  base = layer["baseline"]
  out = ["", f"Layer: top-1, {grid['tokens']} tokens, m={grid['d_model']}, h={grid['d_ff']}; "
         "ratio = MoE fwd+bwd / dense FFN fwd+bwd with the same active FLOPs per token, "
         "tokens as one 2-D matrix. Dense FFN: "
         f"{base['dense_ms']:.1f} ms = **{base['dense_gflops']:.0f} GFLOP/s**; GEMM peak "
         f"(one [T,m]@[m,h] matmul): {base['gemm_ms']:.1f} ms = "
         f"**{base['gemm_gflops']:.0f} GFLOP/s**.", "",
         "| E | group S | cf | dispatch | MoE ms | dense ms | ratio |",
         "|---|---|---|---|---|---|---|"]
  for r in layer["rows"]:
    cf = "-" if strategy(r["dispatch"])[0] == "dropless" else r["capacity_factor"]
    out.append(f"| {r['experts']} | {r['group_size']} | {cf} | {r['dispatch']} | "
               f"{r['moe_ms']:.1f} | {r['dense_ms']:.1f} | **{r['ratio']:.2f}** |")
  return out + [f"\nCustom calls in the compiled {r['dispatch']} layer, E={r['experts']}: "
                f"{', '.join(r['custom_calls']) or 'none'}." for r in layer["rows"]
                if "custom_calls" in r]


def _plot_layer(ax, layer: dict) -> None:
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  rows, cf_plot = layer["rows"], 1.25
  for d, marker in (("einsum", "o"), ("indices", "s")):
    for e in sorted({r["experts"] for r in rows}):
      pts = [(r["group_size"], r["ratio"]) for r in rows
             if r["dispatch"] == d and r["experts"] == e and r["capacity_factor"] == cf_plot]
      if pts:
        ax.plot(*zip(*sorted(pts)), marker=marker, label=f"{d} E={e}")
  sizes = sorted({r["group_size"] for r in rows})
  for r in rows:
    if strategy(r["dispatch"])[0] == "dropless":
      ax.axhline(r["ratio"], ls=":", color="gray")
      ax.text(sizes[0], r["ratio"] * 1.02, f"{r['dispatch']} E={r['experts']}", fontsize=7)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(cf_plot, color="k", lw=0.8, ls="--")
  ax.set(xscale="log", xlabel="group size S", ylabel="MoE / dense (2-D) fwd+bwd time",
         title=f"MoE layer vs dense FFN (top-1, cf {cf_plot}; dashed: cf x dense)")
  ax.set_xticks(sizes, [str(v) for v in sizes], minor=False)
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.legend(fontsize=7)


def ops_suite(grid: dict) -> list[dict]:
  """Per E and strategy (S = ops_group_size, cf 1.25, top-1): fwd+bwd of the router alone,
  of the expert matmuls alone (on the rows the strategy computes: E·G·C, or T rounded per
  expert to ROW_UNIT for dropless), and of the whole layer; dispatch + combine = the rest.
  The 2-D dense FFN is timed in the same rounds: layer / dense is the targets' ratio."""
  m, h, tokens, s = grid["d_model"], grid["d_ff"], grid["tokens"], grid["ops_group_size"]
  dtype = grid["dtype"]
  dense, dargs = dense_fwd_bwd(m, h, tokens, dtype)
  rows = []
  for e in tqdm.tqdm(grid["ops_experts"], desc="ops", file=sys.stdout):
    router = routing.TokensChooseRouter(e)
    for d in grid["strategies"]:
      layer_fn, layer_args = moe_fwd_bwd(e, m, h, tokens, s, 1.25, d, dtype=dtype)
      dispatch, impl = strategy(d)
      layer = moe_layer.MoeLayer(num_experts=e, d_ff=h, router=router, group_size=s,
                                 dispatch=dispatch)
      g, _ = layer.group_shape(1, tokens, 1)
      capacity = layer.expert_capacity(s, deterministic=False)
      params = layer_args[0]
      groups = layer_args[1].reshape(g, s, m)

      def route(w, x, capacity=capacity):
        out = router.apply({"params": {"w": w}}, x, capacity=capacity, deterministic=True)
        return jnp.sum(out.gate) + out.load_balance_loss + out.router_z_loss
      router_fn = jax.jit(jax.grad(route, argnums=(0, 1)))
      if dispatch == "dropless":
        per_expert = -(-tokens // e // dispatch_lib.ROW_UNIT) * dispatch_lib.ROW_UNIT
        shape, expert_rows = (per_expert * e, m), per_expert * e
      else:
        shape, expert_rows = (e, g, capacity, m), e * g * capacity
      xs = jax.random.normal(jax.random.key(5), shape, dtype)

      def ffn(wi, wo, x, dispatch=dispatch, impl=impl, e=e, per_row=shape[0] // e):
        experts = dispatch_lib.Experts(wi=[wi.astype(dtype)], wo=wo.astype(dtype),
                                       activations=[jax.nn.relu], grouped_impl=impl)
        if dispatch == "dropless":
          y = experts.grouped(x, jnp.full((e,), per_row, jnp.int32))
        else:
          y = experts.dense(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)
      experts_fn = jax.jit(jax.grad(ffn, argnums=(0, 1, 2)))
      t = timed_blocks({
          "layer": lambda: layer_fn(*layer_args),
          "router": lambda: router_fn(params["router"]["w"], groups),
          "experts": lambda: experts_fn(params["wi"], params["wo"], xs),
          "dense": lambda: dense(*dargs)},
          grid["calls"], grid["rounds"])
      rows.append({"experts": e, "dispatch": d, "group_size": s, "capacity": capacity,
                   **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                   "layer_over_dense": t["layer"] / t["dense"],
                   "dispatch_combine_ms": 1e3 * (t["layer"] - t["router"] - t["experts"]),
                   "router_gflops": 3 * 2 * tokens * m * e / t["router"] / 1e9,
                   "experts_gflops": 3 * 4 * expert_rows * m * h / t["experts"] / 1e9})
  return rows


def _ops_section(ops: list[dict], grid: dict) -> list[str]:
  out = ["", "Where the time goes (fwd+bwd, cf 1.25): router and expert matmuls timed alone; "
         "dispatch + combine = layer - router - experts; layer / dense: against the 2-D "
         "dense FFN timed in the same rounds.", "",
         "| E | dispatch | C | layer ms | dense ms | layer / dense | router ms | "
         "router GFLOP/s | experts ms | experts GFLOP/s | dispatch+combine ms |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in ops:
    c = "-" if strategy(r["dispatch"])[0] == "dropless" else r["capacity"]
    out.append(f"| {r['experts']} | {r['dispatch']} | {c} | {r['layer_ms']:.1f} | "
               f"{r['dense_ms']:.1f} | **{r['layer_over_dense']:.2f}** | "
               f"{r['router_ms']:.1f} | {r['router_gflops']:.1f} | {r['experts_ms']:.1f} | "
               f"{r['experts_gflops']:.0f} | {r['dispatch_combine_ms']:.1f} |")
  return out


def _plot_ops(ax, ops: list[dict]) -> None:
  """Stacked fwd+bwd ms per (E, strategy): router, expert matmuls, dispatch + combine; the 2-D
  dense FFN and 1.25 x it over each bar."""
  x = np.arange(len(ops))
  bottom = np.zeros(len(ops))
  for key, label in (("router_ms", "router"), ("experts_ms", "expert matmuls"),
                     ("dispatch_combine_ms", "dispatch + combine")):
    v = np.array([max(r[key], 0.0) for r in ops])
    ax.bar(x, v, bottom=bottom, label=label)
    bottom += v
  for i, r in enumerate(ops):
    ax.hlines(r["dense_ms"], i - 0.4, i + 0.4, color="k",
              label="dense FFN (2-D)" if i == 0 else None)
    ax.hlines(1.25 * r["dense_ms"], i - 0.4, i + 0.4, color="k", ls="--",
              label="1.25 x dense" if i == 0 else None)
    ax.text(i, bottom[i], f"{r['layer_over_dense']:.2f}x", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(x, [f"E={r['experts']}\n{r['dispatch']}" for r in ops], fontsize=8)
  ax.set(ylabel="fwd+bwd ms", title="Where the layer's time goes (cf 1.25; label: / dense)")
  ax.legend(fontsize=7)


def memory_suite(grid: dict) -> list[dict]:
  """Compiled temp bytes of the layer's fwd+bwd, no execution needed: einsum vs tokens at a
  fixed group size and vs group size at fixed tokens; dropless vs tokens."""
  m, h = grid["d_model"], grid["d_ff"]
  s = grid["memory_group_size"]
  cases = [("tokens", t, s, "einsum") for t in grid["memory_tokens"]]
  cases += [("group_size", grid["memory_fixed_tokens"], gs, "einsum")
            for gs in grid["memory_group_sizes"]]
  cases += [("tokens", t, s, "dropless") for t in grid["memory_tokens"]]
  rows = []
  for sweep, tokens, gs, d in tqdm.tqdm(cases, desc="memory", file=sys.stdout):
    fn, args = moe_fwd_bwd(8, m, h, tokens, gs, 1.25, d)
    stats = fn.lower(*args).compile().memory_analysis()
    rows.append({"sweep": sweep, "dispatch": d, "tokens": tokens, "group_size": gs,
                 "temp_bytes": int(stats.temp_size_in_bytes)})
  return rows


def _memory_section(memory: list[dict], grid: dict) -> list[str]:
  out = ["", "Peak temporary memory of fwd+bwd (E=8, cf 1.25, XLA memory analysis):", "",
         "| dispatch | sweep | tokens | group S | temp MiB | MiB per 1k tokens |",
         "|---|---|---|---|---|---|"]
  for r in memory:
    mib = r["temp_bytes"] / 2**20
    out.append(f"| {r['dispatch']} | {r['sweep']} | {r['tokens']} | {r['group_size']} | "
               f"{mib:.1f} | {mib / r['tokens'] * 1000:.2f} |")
  return out


def _plot_memory(ax, memory: list[dict]) -> None:
  for d in ("einsum", "dropless"):
    for sweep in ("tokens", "group_size"):
      pts = [(r[sweep], r["temp_bytes"] / 2**20) for r in memory
             if r["sweep"] == sweep and r["dispatch"] == d]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=f"{d} vs {sweep}")
  ax.set(xscale="log", yscale="log", xlabel="tokens or group size",
         ylabel="temp memory (MiB)", title="Peak memory: linear in tokens at fixed S")
  ax.legend()


def hf_matched_layer(num_experts: int, d_ff: int, capacity: int, seq_len: int,
                     dispatch: str) -> moe_layer.MoeLayer:
  """moe_jax's layer as HF's SparseMLP computes it: one group per sequence and HF's fixed
  expert capacity, also when applied deterministically (an eval capacity factor would give
  2.0 · S/E slots, 60% more expert rows than HF's at cf 1.25)."""
  return moe_layer.MoeLayer(num_experts=num_experts, d_ff=d_ff,
                            router=routing.TokensChooseRouter(num_experts),
                            fixed_capacity=capacity, group_size=seq_len, dispatch=dispatch)


def hf_state_dict(params: dict) -> dict:
  """moe_jax MoE layer params (router w [m,e], wi [e,m,h], wo [e,h,m]) as HF SparseMLP's
  state dict (torch Linear weights are [out, in])."""
  import torch
  sd = {"router.classifier.weight": np.asarray(params["router"]["w"]).T}
  for j in range(params["wi"].shape[0]):
    sd[f"experts.expert_{j}.wi.weight"] = np.asarray(params["wi"][j]).T
    sd[f"experts.expert_{j}.wo.weight"] = np.asarray(params["wo"][j]).T
  return {k: torch.tensor(v) for k, v in sd.items()}


def hf_suite(grid: dict) -> list[dict]:
  """moe_jax's strategies vs HF SwitchTransformersSparseMLP, same weights and groups (one per
  sequence, HF's capacity); flaxformer through its recorded ratio to HF (FLAXFORMER_RECORDED)."""
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
    torch_moe = hf.SwitchTransformersSparseMLP(config)
    torch_dense = hf.SwitchTransformersDenseActDense(config)
    x_np = np.random.default_rng(0).normal(size=(tokens // seq, seq, m)).astype(np.float32)
    x_t = torch.tensor(x_np, requires_grad=True)

    def torch_step(module):
      module.zero_grad(set_to_none=True)
      x_t.grad = None
      module(x_t).pow(2).mean().backward()

    timings = {}
    for d in ("einsum", "indices", "dropless"):
      layer = hf_matched_layer(e, h, cap, seq, d)
      x = jnp.asarray(x_np)
      params = nn.unbox(layer.init({"params": jax.random.key(1)}, x, deterministic=True)["params"])
      if d == "einsum":  # identical weights in both frameworks
        torch_moe.load_state_dict(hf_state_dict(params))
      fn = jax.jit(jax.grad(lambda p, x, layer=layer: jnp.mean(
          layer.apply({"params": p}, x, deterministic=True) ** 2), argnums=(0, 1)))
      timings[d] = (fn, params, x)
    t = timed_blocks({
        **{d: (lambda f=f, p=p, x=x: f(p, x)) for d, (f, p, x) in timings.items()},
        "hf_moe": lambda: torch_step(torch_moe), "hf_dense": lambda: torch_step(torch_dense)},
        grid["calls"], grid["rounds"])
    best = min(("einsum", "indices", "dropless"), key=t.get)
    flax = FLAXFORMER_RECORDED.get(e)
    rows.append({"experts": e, "tokens": tokens, "seq_len": seq, "capacity": cap,
                 **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                 "hf_moe_over_hf_dense": t["hf_moe"] / t["hf_dense"],
                 "einsum_over_hf": t["einsum"] / t["hf_moe"], "best": best,
                 "best_over_hf": t[best] / t["hf_moe"],
                 # flaxformer's faster (scatter) router / HF, recorded; > 1: moe_jax is faster
                 "flaxformer_over_hf": flax and flax["scatter_ms"] / flax["hf_ms"],
                 "speedup_vs_flaxformer": flax and flax["scatter_ms"] / flax["hf_ms"]
                 / (t[best] / t["hf_moe"])})
  return rows


def _hf_section(hf_rows: list[dict], grid: dict) -> list[str]:
  out = ["", "Against HF transformers SwitchTransformersSparseMLP (PyTorch CPU), same weights, "
         "fwd+bwd, groups = sequences; flaxformer (scatter router) through its recorded "
         "ratio to HF (scripts/benchmark.py FLAXFORMER_RECORDED):", "",
         "| E | tokens | C | HF MoE ms | einsum ms | indices ms | dropless ms | "
         "HF MoE / HF dense | best | best / HF | flaxformer / HF (recorded) | "
         "speed-up vs flaxformer |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in hf_rows:
    flax = (f"{r['flaxformer_over_hf']:.2f} | {r['speedup_vs_flaxformer']:.2f}"
            if r["flaxformer_over_hf"] else " | ")
    out.append(f"| {r['experts']} | {r['tokens']} | {r['capacity']} | {r['hf_moe_ms']:.1f} | "
               f"{r['einsum_ms']:.1f} | {r['indices_ms']:.1f} | {r['dropless_ms']:.1f} | "
               f"{r['hf_moe_over_hf_dense']:.2f} | {r['best']} | **{r['best_over_hf']:.2f}** | "
               f"{flax} |")
  return out


def compiled_train_step(name: str, bindings: list[str], make_batch: Callable[[object], dict],
                        lengths: dict, pack: bool) -> tuple[object, Callable[[], object]]:
  """(model, step): gin model `name` with `bindings` and a thunk that runs one compiled
  Trainer.train_step (Adafactor) on make_batch(model), carrying the donated state on. The
  model's MoE layer factories are gin-bound and resolve when the module is set up, so it is
  built and compiled while its config is in force, which is cleared afterwards."""
  import gin

  from moe_jax import config, optimizers, partitioning, trainer

  model = config.build_model([f"models/{name}.gin"], bindings)
  batch = make_batch(model)
  partitioner = partitioning.Partitioner()
  tr = trainer.Trainer(model, partitioner, trainer.batch_shapes(
      lengths, len(batch["encoder_input_tokens"]), pack), optimizers.adafactor)
  sharded = partitioner.shard_batch(batch)
  holder = {"state": tr.init_state(0)}

  def step():
    holder["state"], metrics = tr.train_step(holder["state"], sharded, 0.01)
    return metrics
  jax.block_until_ready(step())  # compile
  gin.clear_config()
  return model, step


def train_suite(grid: dict) -> list[dict]:
  """Training tokens/s of each (Switch, dense) pair of models with equal FLOPs per token
  (switch_tiny / t5_tiny; switch_mini / t5_mini in the full grid) in the trainer's own step
  (Trainer.train_step: loss, grads, Adafactor, non-finite guard, donated state) on packed
  batches of the pretrain run's task and shapes (gin/runs/pretrain.gin), counted as the trainer
  counts (non-padding tokens). Each pair in one process, timed in blocks of steps."""
  from moe_jax import run_config

  batch_size, lengths = grid["train_batch"], grid["train_lengths"]
  it = run_config.data_module().get_dataset("pydocs_span_corruption", lengths, "train", batch_size)
  local = next(it)
  tokens = int(np.count_nonzero(local["encoder_input_tokens"])
               + np.count_nonzero(local["decoder_target_tokens"]))
  rows = []
  for sparse, dense in grid["train_pairs"]:
    steps = {name: compiled_train_step(name, [], lambda _: local, lengths, True)[1]
             for name in (sparse, dense)}
    t = timed_blocks(steps, grid["train_calls"], grid["rounds"])
    rows += [{"model": k, "step_ms": 1e3 * v, "tokens_per_s": tokens / v} for k, v in t.items()]
    rows.append({"model": f"{sparse} / {dense}", "tokens_per_s_ratio": t[dense] / t[sparse]})
  return rows


def _train_section(train: list[dict], grid: dict) -> list[str]:
  out = ["", f"Training step (Trainer.train_step: fwd+bwd, Adafactor, guard), batch "
         f"{grid['train_batch']}, lengths {grid['train_lengths']}, packed pretrain task; "
         f"{grid['train_calls']} steps per block:", "", "| model | step ms | tokens/s |",
         "|---|---|---|"]
  for r in train:
    if "tokens_per_s" in r:
      out.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} |")
    else:
      out.append(f"| {r['model']} | | **{r['tokens_per_s_ratio']:.2f}** |")
  return out


def peak_flops(device_kind: str) -> float | None:
  """A device kind's bf16 peak FLOP/s per chip (PEAK_BF16_FLOPS), None if not listed."""
  names = [k for k in PEAK_BF16_FLOPS if k in device_kind]
  return PEAK_BF16_FLOPS[max(names, key=len)] if names else None


def synthetic_batch(batch_size: int, lengths: dict, vocab_size: int) -> dict:
  """Unpacked full-length sequences of random token ids (no padding): every position is a
  real token, as model FLOPs count them."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, vocab_size, (batch_size, lengths["inputs"]), dtype=np.int32)
  targets = rng.integers(2, vocab_size, (batch_size, lengths["targets"]), dtype=np.int32)
  return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": np.ones_like(targets, np.float32)}


def mfu_suite(grid: dict) -> list[dict]:
  """Model FLOPs utilization of the trainer's step (Trainer.train_step with Adafactor, one
  mesh over every local device) for each (gin model, bindings) of grid['mfu_models'], on
  synthetic full-length batches: model FLOPs per step (moe_jax.flops: no empty capacity
  slots, no dispatch) / step time / (devices x the chip's bf16 peak). `gemm_fraction` divides
  by a plain [n,n]@[n,n] matmul in the models' dtype measured in the same run instead."""
  from moe_jax import flops

  batch_size, lengths, dtype = grid["mfu_batch"], grid["mfu_lengths"], grid["dtype"]
  n = grid["mfu_gemm_size"]
  mm, margs = gemm(n, n, n, dtype)
  steps, rows = {}, []
  for name, bindings in grid["mfu_models"]:
    model, step = compiled_train_step(
        name, [f"ACTIVATION_DTYPE = '{dtype}'", *bindings],
        lambda model: synthetic_batch(batch_size, lengths, model.module.config.vocab_size),
        lengths, False)
    label = " ".join([name, *bindings])
    steps[label] = step
    rows.append({"model": label, "flops_per_step": flops.train_step_flops(
        model, batch_size, lengths["inputs"], lengths["targets"])})
  t = timed_blocks({**steps, "gemm": lambda: mm(*margs)}, grid["train_calls"], grid["rounds"])
  devices = jax.device_count()
  peak = grid.get("peak_flops") or peak_flops(jax.devices()[0].device_kind)
  gemm_flops = 2 * n ** 3 / t["gemm"]
  for r in rows:
    achieved = r["flops_per_step"] / t[r["model"]]
    r.update(step_ms=1e3 * t[r["model"]],
             tokens_per_s=batch_size * (lengths["inputs"] + lengths["targets"]) / t[r["model"]],
             achieved_tflops=achieved / 1e12, devices=devices,
             peak_tflops=peak and peak / 1e12, mfu=peak and achieved / (devices * peak),
             gemm_tflops=gemm_flops / 1e12, gemm_fraction=achieved / (devices * gemm_flops))
  return rows


def _mfu_section(mfu: list[dict], grid: dict) -> list[str]:
  first = mfu[0]
  peak = (f"{first['peak_tflops']:.0f} TFLOP/s per chip (data sheet, bf16 dense)"
          if first["peak_tflops"] else "none known for this device (--peak_tflops)")
  out = ["", f"MFU of the training step (Trainer.train_step, Adafactor), {first['devices']} "
         f"device(s), batch {grid['mfu_batch']}, lengths {grid['mfu_lengths']}, synthetic "
         f"full-length sequences; model FLOPs from moe_jax.flops. Peak: {peak}; a "
         f"{grid['mfu_gemm_size']}³ matmul measured {first['gemm_tflops']:.3g} TFLOP/s in "
         "the same run.", "",
         "| model | step ms | tokens/s | model TFLOP/step | TFLOP/s | MFU | / measured GEMM |",
         "|---|---|---|---|---|---|---|"]
  for r in mfu:
    mfu_pct = f"**{100 * r['mfu']:.1f}%**" if r["mfu"] else "-"
    out.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
               f"{r['flops_per_step'] / 1e12:.3g} | {r['achieved_tflops']:.3g} | {mfu_pct} | "
               f"{100 * r['gemm_fraction']:.1f}% |")
  return out


@dataclasses.dataclass(frozen=True)
class Suite:
  """A suite: its measurement (grid -> the JSON's rows), its RESULTS.md section (rows, grid ->
  Markdown lines) and its panel of benchmark.png (axes, rows), if any."""
  run: Callable[[dict], object]
  section: Callable[[object, dict], list[str]]
  panel: Callable[[object, object], None] | None = None


# In the order of RESULTS.md's sections and benchmark.png's panels.
SUITES = {"layer": Suite(layer_suite, _layer_section, _plot_layer),
          "ops": Suite(ops_suite, _ops_section, _plot_ops),
          "memory": Suite(memory_suite, _memory_section, _plot_memory),
          "hf": Suite(hf_suite, _hf_section),
          "train": Suite(train_suite, _train_section),
          "mfu": Suite(mfu_suite, _mfu_section)}


def markdown(results: dict) -> str:
  env, grid = results["environment"], results["grid"]
  out = [f"# moe_jax benchmarks ({results['grid_name']} grid, {grid['dtype']})", "",
         f"{env['backend']} · {env['device']} · {env['cpus']} CPUs · jax {env['jax']} · "
         f"load average at start {env['load_average']} · command: `{results['command']}`", "",
         f"Timing: each function {grid['calls']} calls in a row after an untimed one, "
         f"{grid['rounds']} alternating rounds, median over rounds."]
  for name, suite in SUITES.items():
    if results.get(name):
      out += suite.section(results[name], grid)
  return "\n".join(out) + "\n"


def plots(results: dict, out: pathlib.Path) -> bool:
  """benchmark.png: one panel per suite run that has one; False when none ran."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = [(k, s.panel) for k, s in SUITES.items() if s.panel and results.get(k)]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
  for ax, (k, plot) in zip(axes[0], panels):
    plot(ax, results[k])
  fig.tight_layout()
  fig.savefig(out / "benchmark.png", dpi=110)
  return True


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
  parser.add_argument("--quick", action="store_true", help="--grid quick: a few minutes on CPU")
  parser.add_argument("--suites", default=None, help="comma-separated (default: the grid's)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the chip's peak for MFU where PEAK_BF16_FLOPS does not know it")
  parser.add_argument("--out", default=None, help="directory for results.json, RESULTS.md, plots")
  args = parser.parse_args(argv)
  grid_name = "quick" if args.quick else args.grid
  grid = dict(GRIDS[grid_name], peak_flops=args.peak_tflops and args.peak_tflops * 1e12)
  suites = args.suites.split(",") if args.suites else grid["suites"]
  unknown = set(suites) - set(SUITES)
  if unknown:
    parser.error(f"--suites has unknown {sorted(unknown)}")
  dev = jax.devices()[0]
  results = {"grid_name": grid_name, "grid": grid,
             "command": "python scripts/benchmark.py "
                        + " ".join(argv if argv is not None else sys.argv[1:]),
             "environment": {"backend": jax.default_backend(), "device": dev.device_kind,
                             "cpus": os.cpu_count(), "jax": jax.__version__,
                             "machine": platform.machine(),
                             "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())}}
  out = pathlib.Path(args.out) if args.out else None
  for suite in suites:
    results[suite] = SUITES[suite].run(grid)
    if out:  # after every suite, so a long run that fails late keeps what it measured
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(results, indent=1))
      (out / "RESULTS.md").write_text(markdown(results))
  print(markdown(results))
  if out:
    plotted = plots(results, out)
    print(f"wrote {out}/results.json, RESULTS.md" + (", benchmark.png" if plotted else ""))


if __name__ == "__main__":
  main()
