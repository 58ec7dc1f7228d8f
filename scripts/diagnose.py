"""Side-by-side training dynamics of gin models on the same batches: why does (or doesn't) an
MoE model beat its dense twin?

  python scripts/diagnose.py --model=t5_tiny --model=switch_tiny --steps=1500 --every=100 \\
      --task=multidomain_span_corruption [--gin.LEARNING_RATE=2.0 ...] --out=/tmp/diag

Each model trains with the pretrain run's optimizer (Adafactor, T5 rsqrt schedule) on the same
data stream. Every --every steps, on that step's batch, per parameter group (expert FFNs,
dense FFNs, routers, attention, embeddings): gradient norm, parameter norm and the step's
relative update ||Δθ|| / ||θ||. Expert groups are also reported per expert (one expert is one
FFN: compare it with one dense FFN layer). The MoE layers' router confidence, load CV and
drops come from the train step's own metrics. Writes <out>/diagnose.json and diagnose.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from moe_jax import config, optimizers, partitioning, run_config, trainer


def group_of(path: str, ndim: int) -> str:
  """The parameter group of a param path ('encoder/layers_1/mlp/wi')."""
  if "/router/" in path:
    return "router"
  if "/mlp/" in path:
    return "expert_ffn" if ndim == 3 else "dense_ffn"
  if "attention" in path:
    return "attention"
  if "embed" in path or "relpos" in path:
    return "embedding"
  return "other"


def _flat(tree: Any) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def group_norms(grads: dict[str, np.ndarray], before: dict[str, np.ndarray],
                after: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Per group: gradient norm, param norm, relative update; per FFN (a dense layer's FFN, or
  one expert) the mean gradient norm and relative update."""
  out: dict[str, dict[str, float]] = {}
  sums: dict[str, np.ndarray] = {}
  per_ffn: dict[str, dict[str, list]] = {}
  for path, g in grads.items():
    p0, p1 = before[path].astype(np.float64), after[path].astype(np.float64)
    group = group_of("/" + path + "/", g.ndim)
    s = sums.setdefault(group, np.zeros(3))
    s += [np.sum(np.square(g)), np.sum(np.square(p0)), np.sum(np.square(p1 - p0))]
    if group in ("expert_ffn", "dense_ffn"):
      layer = path.rsplit("/", 1)[0]
      axes = tuple(range(1, g.ndim)) if group == "expert_ffn" else None
      entry = per_ffn.setdefault(group, {}).setdefault(layer, np.zeros((3,) + (
          (g.shape[0],) if axes else ())))
      entry += np.stack([np.sum(np.square(g), axis=axes), np.sum(np.square(p0), axis=axes),
                         np.sum(np.square(p1 - p0), axis=axes)])
  for group, (gg, pp, dd) in sums.items():
    out[group] = {"grad_norm": float(np.sqrt(gg)), "param_norm": float(np.sqrt(pp)),
                  "relative_update": float(np.sqrt(dd / max(pp, 1e-30)))}
  for group, layers in per_ffn.items():
    stacked = np.concatenate([np.atleast_2d(v.T).reshape(-1, 3) for v in layers.values()])
    out[group]["grad_norm_per_ffn"] = float(np.mean(np.sqrt(stacked[:, 0])))
    out[group]["relative_update_per_ffn"] = float(np.mean(np.sqrt(stacked[:, 2] / stacked[:, 1])))
  return out


def moe_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  layers = sorted({k[len("moe/"):].rsplit("/", 1)[0] for k in metrics if k.startswith("moe/")})
  if not layers:
    return {}
  load = [np.asarray(metrics[f"moe/{l}/expert_load"]) for l in layers]
  return {
      "router_confidence": float(np.mean([metrics[f"moe/{l}/router_confidence"] for l in layers])),
      "fraction_dropped": float(np.mean([metrics[f"moe/{l}/fraction_dropped"] for l in layers])),
      "load_cv": float(np.mean([x.std() / x.mean() for x in load])),
  }


def diagnose(model_name: str, bindings: Sequence[str], *, task: str, steps: int, every: int,
             batch_size: int, lengths: dict[str, int], seed: int) -> list[dict[str, Any]]:
  """Trains one model; returns one record per --every steps."""
  model = config.build_model([f"models/{model_name}.gin", "runs/pretrain.gin"], bindings)
  schedule = optimizers.rsqrt_schedule(**{k: config.gin.query_parameter(f"%{m}") for k, m in
                                       (("base_learning_rate", "LEARNING_RATE"),
                                        ("warmup_steps", "WARMUP_STEPS"))})
  part = partitioning.Partitioner()
  tr = trainer.Trainer(model, part, trainer.batch_shapes(lengths, batch_size, True),
                       optimizers.adafactor)
  state = tr.init_state(seed)
  it = run_config.data_module().get_dataset(task, lengths, "train", batch_size, seed=seed)
  grad_fn = jax.jit(jax.grad(lambda p, b, r: model.loss_fn(p, b, r)[0]))
  records: list[dict[str, Any]] = []
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  for step in tqdm(range(steps), desc=model_name, unit="step"):
    batch = part.shard_batch(next(it))
    probe = step % every == 0 or step == steps - 1
    if probe:
      before = _flat(jax.device_get(state.params))
      grads = _flat(jax.device_get(grad_fn(state.params, batch,
                                           jax.random.fold_in(state.rng, state.step))))
    state, metrics = tr.train_step(state, batch, schedule(step))
    if probe:
      metrics = jax.device_get(metrics)
      records.append({"step": step + 1, "cross_ent_loss": float(metrics["cross_ent_loss"]),
                      **moe_metrics(metrics),
                      "groups": group_norms(grads, before, _flat(jax.device_get(state.params)))})
  return records


def plot(results: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = [("cross_ent_loss", "train cross-entropy"),
            ("grad_norm_per_ffn", "gradient norm of one FFN (dense layer or expert)"),
            ("relative_update_per_ffn", "relative update of one FFN per step"),
            ("router_confidence", "router confidence (mean top-1 prob.)")]
  fig, axes = plt.subplots(1, 4, figsize=(20, 4), layout="constrained")
  for i, (name, records) in enumerate(results.items()):
    steps = [r["step"] for r in records]
    for ax, (key, title) in zip(axes, panels):
      if key.endswith("_per_ffn"):
        for group, ls in (("dense_ffn", "-"), ("expert_ffn", "--")):
          ys = [r["groups"].get(group, {}).get(key) for r in records]
          if any(y is not None for y in ys):
            ax.plot(steps, ys, color=f"C{i}", ls=ls, label=f"{name} {group}")
      elif any(key in r for r in records):
        ax.plot(steps, [r.get(key) for r in records], color=f"C{i}", label=name)
      ax.set(title=title, xlabel="step")
      ax.set_yscale("log" if key != "router_confidence" else "linear")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="diagnose.py", description=__doc__.split("\n")[0])
  parser.add_argument("--model", action="append", required=True, help="model gin name")
  parser.add_argument("--task", default="multidomain_span_corruption")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--inputs_length", type=int, default=64)
  parser.add_argument("--targets_length", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/diagnose")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for flag in rest:
    if not flag.startswith("--gin."):
      parser.error(f"unrecognized argument {flag!r} (gin bindings are --gin.NAME=VALUE)")
    bindings.append(flag[len("--gin."):])
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  results = {m: diagnose(m, bindings, task=args.task, steps=args.steps, every=args.every,
                         batch_size=args.batch_size, lengths=lengths, seed=args.seed)
             for m in args.model}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "diagnose.json"), "w") as f:
    json.dump({"args": vars(args), "bindings": bindings, "results": results}, f, indent=1)
  plot(results, os.path.join(args.out, "diagnose.png"))
  for name, records in results.items():
    last = records[-1]
    groups = ", ".join(f"{g} |g| {v['grad_norm']:.3g} upd {v['relative_update']:.2e}"
                       for g, v in last["groups"].items())
    print(f"{name} step {last['step']}: xent {last['cross_ent_loss']:.4f}; {groups}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
