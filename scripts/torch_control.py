"""An independent training control: HF transformers' Switch Transformer and T5 (PyTorch) trained
on the same token batches as moe_jax, at the sizes of moe_jax's model gins.

  # 1. the batches moe_jax's trainer reads (train stream and per-task validation), as .npy
  python scripts/torch_control.py export --task pydocs_span_corruption --out /tmp/batches \\
      --steps 500 --batch_size 32 --inputs_length 64 --targets_length 16 --eval_steps 10
  # 2. train SwitchTransformersForConditionalGeneration and T5ForConditionalGeneration on them
  python scripts/torch_control.py train --data /tmp/batches --out /tmp/control.json \\
      --models switch_tiny,t5_tiny --seeds 0,1,2 --optimizer adamw --learning_rate 1e-3

Export: rows of the global batches, unpacked (pack=False: HF's T5 attention has no segment ids),
from data.get_dataset with the trainer's arguments for the train stream and the trainer's
eval_batches for each task's validation split: DIR/train/<feature>.npy [steps, b, l] and
DIR/validation/<task>/<feature>.npy [<= eval_steps, b, l] for encoder_input_tokens,
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights; DIR/meta.json. A
manpages_* task (moe_jax/multilingual.py) is registered on the way when it is not yet.

Train: each model gin (gin/models/<name>.gin, vocabulary = the export's) is built with moe_jax
and translated to an HF config: layers, d_model, heads, head dim, d_ff, relative-attention
buckets, relu or gated-gelu, tied embeddings, sparse-layer step, experts, capacity factors. The
loss is moe_jax's: cross-entropy over decoder_loss_weights + z_loss · logsumexp² + aux factor ·
load-balance loss + router z factor · router z-loss, router terms averaged (or summed, as the
model's aux_loss_layers says) over the sparse layers. HF semantics where they differ from
moe_jax's defaults (gin/semantics/hf_switch.gin gives moe_jax the same): expert capacity counts
tokens per sequence, here ceil(cf · length / E) (at least min_expert_capacity) with the train
and eval factors; padding is routed and counts in the router losses; router jitter is off
(HF multiplies the experts' inputs by the jitter too, not only the router's). Dropout is the
gin's. AdamW (torch.optim.AdamW, decoupled decay scaled by the learning rate as optax.adamw) or
Adafactor (transformers.optimization.Adafactor, T5 settings), the schedule constant or T5's
rsqrt. Writes a JSON: per run the train losses and per-task eval loss and accuracy; a table of
the mean and spread over seeds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights")
_MANPAGES_TASK = re.compile(r"manpages(_\w+?)?_(span_corruption|prefix_lm)")


# ---------------------------------------------------------------------------------------------
# Export


def _ensure_task(name: str) -> None:
  """Registers the manpages tasks for a manpages_* name that is not registered yet."""
  import seqio  # pylint: disable=import-outside-toplevel
  from moe_jax import data  # pylint: disable=import-outside-toplevel,unused-import
  names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  match = _MANPAGES_TASK.fullmatch(name)
  if name not in names and match:
    from moe_jax import multilingual  # pylint: disable=import-outside-toplevel
    multilingual.register_manpages(match.group(2))


def _stack(batches: Iterable[Mapping[str, np.ndarray]], n: int, what: str, minimum: int
           ) -> dict[str, np.ndarray]:
  """The first n batches as [n', b, l] arrays, n' <= n; fewer than `minimum` is an error."""
  rows = list(itertools.islice(batches, n))
  if len(rows) < minimum:
    raise ValueError(f"{what}: the data gave {len(rows)} batches, fewer than {minimum}")
  return {k: np.stack([np.asarray(b[k], np.int32) for b in rows[:n]]) for k in FEATURES}


def export(task: str, out: str, steps: int, batch_size: int, lengths: Mapping[str, int],
           eval_steps: int, seed: int = 0, gin_bindings: Sequence[str] = ()) -> dict[str, Any]:
  """Writes the batches (see the module docstring); returns meta.json's content. gin_bindings:
  what the task's data needs, as the training run binds it (e.g. its vocabulary)."""
  if gin_bindings:
    import gin  # pylint: disable=import-outside-toplevel
    from moe_jax import data  # pylint: disable=import-outside-toplevel,unused-import
    gin.parse_config(gin_bindings)
  _ensure_task(task)
  import seqio  # pylint: disable=import-outside-toplevel
  from moe_jax import data  # pylint: disable=import-outside-toplevel
  lengths = {"inputs": int(lengths["inputs"]), "targets": int(lengths["targets"])}
  # loop.train's call for one process: the shuffled train stream of the run's seed.
  train = data.get_dataset(task, lengths, "train", batch_size, shuffle=True, seed=seed,
                           pack=False)
  arrays = {"train": _stack(train, steps, "train", steps)}
  provider = seqio.get_mixture_or_task(task)
  tasks = [t.name for t in getattr(provider, "tasks", None) or [provider]]
  from moe_jax import evaluation  # pylint: disable=import-outside-toplevel
  for name in tasks:
    batches = evaluation.eval_batches(name, task_feature_lengths=lengths,
                                      batch_size=batch_size, split="validation",
                                      eval_steps=eval_steps, pack=False, seed=seed)
    # A small language's validation pages may give fewer batches: its eval reads them all, as
    # moe_jax's does (the last one padded with empty rows).
    arrays[f"validation/{name}"] = _stack(batches, eval_steps, f"validation of {name}", 1)
  for part, features in arrays.items():
    os.makedirs(os.path.join(out, part), exist_ok=True)
    for k, v in features.items():
      np.save(os.path.join(out, part, f"{k}.npy"), v)
  vocab = provider.output_features["targets"].vocabulary
  meta = {"task": task, "gin_bindings": list(gin_bindings), "eval_tasks": tasks,
          "task_feature_lengths": lengths,
          "batch_size": batch_size, "steps": steps, "eval_steps": eval_steps, "seed": seed,
          "pack": False, "vocab_size": int(vocab.vocab_size),
          "sentencepiece_model_file": getattr(vocab, "sentencepiece_model_file", None)}
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def load_batches(directory: str) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """(meta, {'train' | 'validation/<task>': {feature: [n, b, l]}}) of an export."""
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  parts = ["train"] + [f"validation/{t}" for t in meta["eval_tasks"]]
  return meta, {p: {k: np.load(os.path.join(directory, p, f"{k}.npy")) for k in FEATURES}
                for p in parts}


# ---------------------------------------------------------------------------------------------
# Models


def _activation(activations: Sequence[str]) -> str:
  forms = {("relu",): "relu", ("gelu", "linear"): "gated-gelu", ("gelu",): "gelu"}
  if tuple(activations) not in forms:
    raise ValueError(f"activations={tuple(activations)} has no HF T5 feed_forward_proj")
  return forms[tuple(activations)]


def _sparse_layers(num_layers: int, step: int) -> list[int]:
  """moe_jax's (and HF's) rule: layer i is sparse iff i % step == 1, every layer for step 1."""
  return [i for i in range(num_layers) if step == 1 or (step > 1 and i % step == 1)]


def hf_model_spec(name: str, vocab_size: int) -> dict[str, Any]:
  """The HF class name, config kwargs and routing settings of gin/models/<name>.gin."""
  from moe_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  model = config_lib.build_model([f"models/{name}.gin"], [f"VOCAB_SIZE = {vocab_size}"])
  c = model.module.config
  kwargs = dict(vocab_size=c.vocab_size, d_model=c.emb_dim, d_kv=c.head_dim, d_ff=c.mlp_dim,
                num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
                num_heads=c.num_heads, dropout_rate=c.dropout_rate,
                relative_attention_num_buckets=c.relative_attention_num_buckets,
                relative_attention_max_distance=c.relative_attention_max_distance,
                layer_norm_epsilon=c.layer_norm_epsilon,
                tie_word_embeddings=c.logits_via_embedding, pad_token_id=0, eos_token_id=1)
  if not c.shared_input_embedding:
    raise ValueError(f"{name}: shared_input_embedding=False has no HF T5 / Switch form")
  losses = dict(z_loss=model.z_loss, aux_loss_factor=getattr(model, "aux_loss_factor", 0.0),
                router_z_loss_factor=getattr(model, "router_z_loss_factor", 0.0),
                aux_loss_layers=getattr(model, "aux_loss_layers", "mean"))
  moe = model.module.encoder_moe or model.module.decoder_moe
  sparse = {"encoder": _sparse_layers(c.num_encoder_layers, c.encoder_sparse_step),
            "decoder": _sparse_layers(c.num_decoder_layers, c.decoder_sparse_step)}
  if moe is None or not any(sparse.values()):
    return dict(name=name, hf_class="T5ForConditionalGeneration",
                config=dict(kwargs, feed_forward_proj=_activation(c.activations)),
                losses=losses, moe=None)
  for m in (model.module.encoder_moe, model.module.decoder_moe):
    if m is None:
      continue
    problems = {"experts' d_ff != mlp_dim (HF has one d_ff)": m.d_ff != c.mlp_dim,
                "top-k routing with k != 1 (HF Switch is top-1)":
                    getattr(m.router, "num_selected_experts", 1) != 1,
                "expert activations differ from the dense ones":
                    tuple(m.activations) != tuple(c.activations),
                "expert dropout (HF has none)": m.dropout_rate > 0,
                "fixed_capacity (give capacity factors)": m.fixed_capacity is not None}
    bad = [k for k, v in problems.items() if v]
    if bad:
      raise ValueError(f"{name}: no HF Switch equivalent: {'; '.join(bad)}")
  config = dict(kwargs, num_experts=moe.num_experts, dense_act_fn=_activation(c.activations),
                num_sparse_encoder_layers=len(sparse["encoder"]),
                num_sparse_decoder_layers=len(sparse["decoder"]), router_jitter_noise=0.0,
                router_aux_loss_coef=losses["aux_loss_factor"],
                router_z_loss_coef=losses["router_z_loss_factor"], expert_capacity=1)
  routing = dict(num_experts=moe.num_experts, sparse_layers=sparse,
                 encoder_sparse_step=c.encoder_sparse_step,
                 decoder_sparse_step=c.decoder_sparse_step,
                 train_capacity_factor=moe.train_capacity_factor,
                 eval_capacity_factor=moe.eval_capacity_factor,
                 min_expert_capacity=moe.min_expert_capacity,
                 moe_jax_router_jitter_noise=getattr(moe.router, "jitter_noise", 0.0))
  return dict(name=name, hf_class="SwitchTransformersForConditionalGeneration", config=config,
              losses=losses, moe=routing)


def capacity(spec: Mapping[str, Any], length: int, train: bool) -> int:
  """HF's expert_capacity: tokens per expert per sequence of `length` tokens."""
  moe = spec["moe"]
  cf = moe["train_capacity_factor"] if train else moe["eval_capacity_factor"]
  return max(math.ceil(cf * length / moe["num_experts"]), moe["min_expert_capacity"])


def build_hf_model(spec: Mapping[str, Any], seed: int):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  if spec["moe"] is None:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**spec["config"]))
  config = transformers.SwitchTransformersConfig(**spec["config"])
  # The exact sparse layers (HF derives the step as layers // sparse layers).
  config.encoder_sparse_step = spec["moe"]["encoder_sparse_step"]
  config.decoder_sparse_step = spec["moe"]["decoder_sparse_step"]
  model = transformers.SwitchTransformersForConditionalGeneration(config)
  sparse = {stack: [i for i, block in enumerate(getattr(model, stack).block) if block.is_sparse]
            for stack in ("encoder", "decoder")}
  if sparse != spec["moe"]["sparse_layers"]:
    raise ValueError(f"HF made layers {sparse} sparse, the gin {spec['moe']['sparse_layers']}")
  return model


def set_capacity(model, spec: Mapping[str, Any], lengths: Mapping[str, int], train: bool) -> None:
  """Sets every router's tokens per expert for encoder / decoder sequences."""
  if spec["moe"] is None:
    return
  for stack, key in (("encoder", "inputs"), ("decoder", "targets")):
    for module in getattr(model, stack).modules():
      if type(module).__name__ == "SwitchTransformersTop1Router":
        module.expert_capacity = capacity(spec, lengths[key], train)


def losses(model, spec: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Any]:
  """moe_jax's loss terms (see the module docstring) for a batch of torch tensors."""
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch
  sparse = spec["moe"] is not None
  targets = batch["decoder_target_tokens"].long()
  out = model(input_ids=batch["encoder_input_tokens"].long(),
              attention_mask=(batch["encoder_input_tokens"] > 0).long(),
              decoder_input_ids=batch["decoder_input_tokens"].long(),
              decoder_attention_mask=(targets > 0).long(),
              **({"output_router_logits": True} if sparse else {}))
  logits = out.logits.float()  # [b,l,v]
  weights = batch["decoder_loss_weights"].float()
  denom = weights.sum().clamp(min=1.0)
  log_z = torch.logsumexp(logits, -1)
  cross_ent = log_z - logits.gather(-1, targets[..., None])[..., 0]
  result = {"cross_ent_loss": (cross_ent * weights).sum() / denom,
            "z_loss": spec["losses"]["z_loss"] * (log_z.square() * weights).sum() / denom,
            "accuracy": ((logits.argmax(-1) == targets).float() * weights).sum() / denom,
            "num_tokens": weights.sum()}
  aux = router_z = torch.zeros(())
  if sparse:
    layers = list(out.encoder_router_logits) + list(out.decoder_router_logits)  # [b,l,e] each
    balance = [hf_switch.load_balancing_loss_func(torch.softmax(r, -1), r.argmax(-1))
               for r in layers]
    zs = [hf_switch.router_z_loss_func(r) for r in layers]
    reduce = torch.sum if spec["losses"]["aux_loss_layers"] == "sum" else torch.mean
    aux = spec["losses"]["aux_loss_factor"] * reduce(torch.stack(balance))
    router_z = spec["losses"]["router_z_loss_factor"] * reduce(torch.stack(zs))
  result.update(aux_loss=aux, router_z_loss=router_z)
  result["loss"] = result["cross_ent_loss"] + result["z_loss"] + aux + router_z
  return result


# ---------------------------------------------------------------------------------------------
# Training


def schedule(kind: str, learning_rate: float, warmup_steps: int):
  """step (0-based, as the trainer) -> learning rate: moe_jax's own schedules, 'constant' or
  T5's 'rsqrt' (learning_rate / sqrt(max(step, warmup_steps)))."""
  from moe_jax import optimizers  # pylint: disable=import-outside-toplevel
  if kind == "constant":
    return optimizers.constant_schedule(learning_rate)
  if kind == "rsqrt":
    return optimizers.rsqrt_schedule(learning_rate, warmup_steps)
  raise ValueError(f"--schedule must be 'constant' or 'rsqrt', got {kind!r}")


def make_optimizer(name: str, params, args: argparse.Namespace):
  import torch  # pylint: disable=import-outside-toplevel
  if name == "adamw":
    return torch.optim.AdamW(params, lr=0.0, betas=(args.b1, args.b2), eps=args.eps,
                             weight_decay=args.weight_decay)
  if name == "adafactor":
    from transformers.optimization import Adafactor  # pylint: disable=import-outside-toplevel
    # T5's: decay 1 - t^-0.8, updates clipped to RMS 1, scaled by the parameter's RMS.
    return Adafactor(params, lr=0.0, scale_parameter=True, relative_step=False,
                     warmup_init=False, decay_rate=-0.8, clip_threshold=1.0, beta1=None)
  raise ValueError(f"--optimizer must be 'adamw' or 'adafactor', got {name!r}")


def _torch_batch(features: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  return {k: torch.from_numpy(np.ascontiguousarray(v[i])) for k, v in features.items()}


def evaluate(model, spec, parts: Mapping[str, Mapping[str, np.ndarray]],
             lengths: Mapping[str, int]) -> dict[str, dict[str, float]]:
  """Token-weighted cross-entropy and accuracy of each task's validation batches."""
  import torch  # pylint: disable=import-outside-toplevel
  model.eval()
  set_capacity(model, spec, lengths, train=False)
  results = {}
  with torch.no_grad():
    for part, features in parts.items():
      if not part.startswith("validation/"):
        continue
      loss_sum = acc_sum = tokens = 0.0
      for i in range(len(features["encoder_input_tokens"])):
        m = losses(model, spec, _torch_batch(features, i))
        n = float(m["num_tokens"])
        loss_sum += float(m["cross_ent_loss"]) * n
        acc_sum += float(m["accuracy"]) * n
        tokens += n
      results[part.split("/", 1)[1]] = {"loss": loss_sum / max(tokens, 1.0),
                                        "accuracy": acc_sum / max(tokens, 1.0),
                                        "tokens": tokens}
  return results


def train_one(spec: Mapping[str, Any], seed: int, meta: Mapping[str, Any],
              parts: Mapping[str, Mapping[str, np.ndarray]], args: argparse.Namespace
              ) -> dict[str, Any]:
  """One model and seed: steps on the exported train batches, then the eval."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.use_deterministic_algorithms(True)
  model = build_hf_model(spec, seed)
  params = list(model.parameters())  # tied weights appear once
  optimizer = make_optimizer(args.optimizer, params, args)
  lr = schedule(args.schedule, args.learning_rate, args.warmup_steps)
  lengths = meta["task_feature_lengths"]
  train = parts["train"]
  steps = min(args.steps or meta["steps"], len(train["encoder_input_tokens"]))
  import tqdm  # pylint: disable=import-outside-toplevel
  rows, curve, seconds = [], [], 0.0
  period = getattr(args, "eval_period", 0)
  for step in tqdm.trange(steps, desc=f"{spec['name']} seed {seed}", unit="step"):
    if step == 0 or not model.training:
      model.train()
      set_capacity(model, spec, lengths, train=True)
    start = time.perf_counter()
    for group in optimizer.param_groups:
      group["lr"] = lr(step)
    m = losses(model, spec, _torch_batch(train, step))
    optimizer.zero_grad(set_to_none=True)
    m["loss"].backward()
    optimizer.step()
    rows.append({k: float(v.detach()) for k, v in m.items() if k != "num_tokens"})
    seconds += time.perf_counter() - start  # training time alone, evals left out
    if not math.isfinite(rows[-1]["loss"]):
      raise FloatingPointError(f"{spec['name']} seed {seed}: non-finite loss at step {step}")
    if period and (step + 1) % period == 0 and step + 1 < steps:
      curve.append({"step": step + 1, "eval": evaluate(model, spec, parts, lengths)})
  evals = evaluate(model, spec, parts, lengths)
  curve.append({"step": steps, "eval": evals})
  return {"model": spec["name"], "seed": seed, "steps": steps, "train_seconds": seconds,
          "eval_curve": [{"step": c["step"], "eval_loss": _mean_loss(c["eval"])} for c in curve],
          "params": sum(p.numel() for p in params),
          "train_loss": [r["loss"] for r in rows],
          "train_cross_ent_loss": [r["cross_ent_loss"] for r in rows],
          "train_aux_loss": [r["aux_loss"] for r in rows],
          "eval": evals, "eval_loss": _mean_loss(evals)}


def _mean_loss(evals: Mapping[str, Mapping[str, float]]) -> float:
  """The eval loss of a run: the mean over tasks (languages) of each task's loss."""
  return float(np.mean([e["loss"] for e in evals.values()]))


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per model: eval loss (mean over tasks) mean and standard deviation over seeds."""
  table = []
  for name in dict.fromkeys(r["model"] for r in runs):
    losses_ = [r["eval_loss"] for r in runs if r["model"] == name]
    table.append({"model": name, "seeds": len(losses_), "eval_loss_mean": float(np.mean(losses_)),
                  "eval_loss_std": float(np.std(losses_, ddof=1)) if len(losses_) > 1 else 0.0,
                  "final_train_loss_mean": float(np.mean(
                      [r["train_cross_ent_loss"][-1] for r in runs if r["model"] == name]))})
  return table


def train(args: argparse.Namespace) -> dict[str, Any]:
  meta, parts = load_batches(args.data)
  specs = [hf_model_spec(name, meta["vocab_size"]) for name in args.models.split(",")]
  runs = []
  for spec in specs:
    for seed in (int(s) for s in args.seeds.split(",")):
      run = train_one(spec, seed, meta, parts, args)
      runs.append(run)
      print(f"{spec['name']:16} seed {seed}: train loss {run['train_cross_ent_loss'][-1]:.4f}, "
            f"eval loss {run['eval_loss']:.4f} ({run['train_seconds']:.1f} s)", flush=True)
  lengths = meta["task_feature_lengths"]
  models = {s["name"]: dict(s, **({"expert_capacity": {
      "encoder_train": capacity(s, lengths["inputs"], True),
      "encoder_eval": capacity(s, lengths["inputs"], False),
      "decoder_train": capacity(s, lengths["targets"], True),
      "decoder_eval": capacity(s, lengths["targets"], False)}} if s["moe"] else {}))
      for s in specs}
  settings = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
  result = {"data": meta, "settings": settings, "models": models, "runs": runs,
            "table": summarize(runs)}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  for row in result["table"]:
    print(f"{row['model']:16} eval loss {row['eval_loss_mean']:.4f} ± {row['eval_loss_std']:.4f}"
          f" over {row['seeds']} seed(s)")
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="write moe_jax's batches as .npy")
  ex.add_argument("--task", default="pydocs_span_corruption")
  ex.add_argument("--out", required=True)
  ex.add_argument("--steps", type=int, required=True)
  ex.add_argument("--batch_size", type=int, default=32)
  ex.add_argument("--inputs_length", type=int, default=64)
  ex.add_argument("--targets_length", type=int, default=16)
  ex.add_argument("--eval_steps", type=int, default=10)
  ex.add_argument("--seed", type=int, default=0)
  ex.add_argument("--gin_binding", action="append", default=[], metavar="NAME=VALUE",
                  help="a gin binding the task's data needs, e.g. "
                  "\"get_vocabulary.corpus='pystdlib'\" (repeatable)")
  tr = sub.add_parser("train", help="train the HF models on an export")
  tr.add_argument("--data", required=True, help="an export's directory")
  tr.add_argument("--out", default=None, help="the JSON to write")
  tr.add_argument("--models", default="switch_tiny,t5_tiny", help="gin/models/<name>.gin")
  tr.add_argument("--seeds", default="0")
  tr.add_argument("--steps", type=int, default=None, help="default: every exported batch")
  tr.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
  tr.add_argument("--learning_rate", type=float, default=1e-3)
  tr.add_argument("--schedule", default="constant", choices=["constant", "rsqrt"])
  tr.add_argument("--warmup_steps", type=int, default=10_000, help="rsqrt only")
  # optimizers.adamw's defaults.
  tr.add_argument("--b1", type=float, default=0.9)
  tr.add_argument("--b2", type=float, default=0.999)
  tr.add_argument("--eps", type=float, default=1e-8)
  tr.add_argument("--weight_decay", type=float, default=1e-4)
  tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  tr.add_argument("--eval_period", type=int, default=0,
                  help="steps between evals during training (0: only at the end)")
  args = parser.parse_args(argv)
  if args.command == "export":
    if min(args.steps, args.batch_size, args.eval_steps) < 1:
      parser.error("--steps, --batch_size and --eval_steps must be >= 1")
    return export(args.task, args.out, args.steps, args.batch_size,
                  {"inputs": args.inputs_length, "targets": args.targets_length},
                  args.eval_steps, args.seed, args.gin_binding)
  if args.threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
  return train(args)


if __name__ == "__main__":
  main(sys.argv[1:])
