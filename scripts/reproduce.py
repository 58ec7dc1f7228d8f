"""Paper claims at CPU scale, one command each: trains the variants, writes JSON + a plot.

  python scripts/reproduce.py --list
  python scripts/reproduce.py sample_efficiency [--seeds 0 1 2] [--steps 3000] [--scale mini]

Every run is `python -m moe_jax.train` with the claim's gin files and bindings, in its own
MODEL_DIR under --runs_dir (default runs/reproduce/<model>_<hash of the command>); a finished
run is not trained again (its metrics reach the last step), so claims share their common runs
and re-running a command only redoes the analysis. Results go to --out (default
docs/results): <claim>.json (every curve, the figures, the commands, seeds, wall times and the
Python version of the data) and <claim>.png (<claim>_mini.* at --scale mini); it prints the
Markdown table that docs/results.md shows.

--alone starts each run only once the machine is idle (1-minute load average < 0.5): a run's
wall-clock seconds count only when it and its dense partner started so (time_to_reach), and a
run that just ended keeps the load up for a minute or two.

--quick shrinks a claim to a smoke-sized run on the tiny models (the test suite checks the
direction of the robust effects this way); its figures are not results.

A claim is an entry of CLAIMS (its runs: claims.Variant, claims.Stage) naming an entry of
ANALYSES (its figures, the Markdown it prints, its plot).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from typing import Any, Callable, Sequence

import numpy as np

from claims import (ALONE_LOAD, ROOT, Claim, Stage, Trained, Variant, hf_control,
                    own_batches_xent, plan, train)

# Scales: 'tiny' (d_model 128, 2+2 layers, 8 experts: ~5 min per 1500 steps on 2 cores) and
# 'mini' (d_model 256, 4+4 layers, 16 experts: ~8x the compute).
SCALES = ("tiny", "mini")
# The claims train with the prefix-LM objective (a random prefix of up to 63 tokens in, the rest
# out: ~1,000 predicted tokens per step). T5 span corruption at these lengths predicts ~450 per
# step; there even 8x the FFN parameters barely help in 1,500 steps (the *_span claims), so no
# MoE could win (docs/results.md).
_DENSE = Variant("dense T5", "t5")
_SWITCH = Variant("Switch", "switch")
# Switch's extra parameters given to a dense model instead: every FFN 8x wider (4.5x the
# FLOPs of the others at tiny scale). If this does not beat the dense model, parameters are not
# what limits the set-up and no MoE can win in it.
_WIDE = Variant("dense T5, 8x d_ff (4.5x FLOPs)", "t5",
                scale_bindings=(("tiny", ("MLP_DIM=2048",)), ("mini", ("MLP_DIM=8192",))))


# Experts in each scale's switch gin: that variant is the Switch baseline run, not a copy of it.
_GIN_EXPERTS = {"tiny": 8, "mini": 16}


def _experts(e: int) -> Variant:
  if e == 1:
    return _DENSE
  return Variant(f"{e} experts", "switch", scale_bindings=tuple(
      (scale, () if n == e else (f"NUM_EXPERTS={e}",)) for scale, n in _GIN_EXPERTS.items()))


def _span(claim: Claim) -> Claim:
  """The claim on T5 span corruption (pretrain.gin's lengths: 64 in, 16 out) instead."""
  return dataclasses.replace(claim, title=f"{claim.title}, span corruption",
                             task="multidomain_span_corruption", bindings=())


def _stdlib(claim: Claim, title: str, paper: str) -> Claim:
  """The claim on the Python standard library's source, with its own vocabulary; one seed."""
  return dataclasses.replace(claim, title=title, paper=paper, task="pystdlib_prefix_lm",
                             bindings=(*claim.bindings, "data.get_vocabulary.corpus='pystdlib'"),
                             seeds=(0,))


# The multilingual manual-pages corpus (gin/runs/manpages.gin: one task per installed language,
# their temperature-sampled mixture, the corpus' own vocabulary). Each language is its own eval
# task; EVAL_STEPS=4 (~4k eval tokens per language) keeps ~27 evals from doubling a run.
_MULTILINGUAL_PAPER = ("Switch Transformer Sec. 5.4 / Fig. 7: mSwitch-Base beats mT5-Base in all "
                       "101 languages, reaching its quality >= 4x faster in most")


def _multilingual(title: str, variants: tuple[Variant, ...], seeds: tuple[int, ...],
                  objective: str = "prefix_lm", extra: tuple[str, ...] = ()) -> Claim:
  """A claim on the manual-pages mixture: prefix LM at 64/64, or span corruption at
  pretrain.gin's 64/16; `extra` bindings last."""
  bindings = ("TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",) if objective == "prefix_lm" \
      else (f"multilingual.register_manpages.objective='{objective}'",)
  return Claim(title, _MULTILINGUAL_PAPER, variants, task=f"manpages_{objective}", seeds=seeds,
               bindings=(*bindings, "EVAL_STEPS=4", *extra), analysis="languages",
               data_gin="manpages.gin")


# Two of the levers the papers name for more MoE gain: a sparse FFN in every layer (2 per stack
# instead of 1; alone, 2x the expert parameters, each expert still seeing 1/8 of its layer's
# tokens), and with it more experts (32 instead of 8): 16x the expert parameters of switch_tiny at
# the same FLOPs per token, each expert seeing 1/32 of the tokens.
_EVERY_LAYER = Variant("Switch, every layer sparse", "switch",
                       ("ENCODER_SPARSE_STEP=1", "DECODER_SPARSE_STEP=1"))
_EVERY_LAYER_32 = Variant("Switch, every layer sparse, 32 experts", "switch",
                          (*_EVERY_LAYER.bindings, "NUM_EXPERTS=32"))


# The independent training control: HF transformers' (PyTorch) T5 and Switch, trained by
# scripts/torch_control.py on the batches each seed's moe_jax runs read, beside moe_jax's dense
# and Switch runs with the settings HF's models have (AdamW at a constant 1e-3, as the script's
# defaults; unpacked rows, as HF's attention has no segment ids; one routing group per sequence,
# no router jitter, padding in the router losses). If HF's Switch gains where moe_jax's does
# not, moe_jax has a training bug.
_CONTROL_BINDINGS = ("OPTIMIZER=@optimizers.adamw",
                     "loop.train.learning_rate_fn=@optimizers.constant_schedule()",
                     "optimizers.constant_schedule.learning_rate=0.001",
                     "run_config.DatasetConfig.pack=False")
_HF_SEMANTICS = ("ROUTER_JITTER_NOISE=0.0", "moe_layer.MoeLayer.group_rule='sequence'",
                 "routing.TokensChooseRouter.loss_tokens='all'")
_CONTROL_PAPER = ("an independent implementation trained on the same batches: does HF's "
                  "Switch gain over HF's T5 where moe_jax's does not?")


def _control(title: str, task: str, data: tuple[str, ...], eval_steps: int,
             data_gin: str | None = None) -> Claim:
  """moe_jax's side of the PyTorch control on `task` (data: the bindings its data needs)."""
  return Claim(title, _CONTROL_PAPER, (_DENSE, dataclasses.replace(_SWITCH, bindings=(
      _HF_SEMANTICS))), task=task, seeds=(0, 1), analysis="torch_control", data_gin=data_gin,
      bindings=("TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", *data,
                f"EVAL_STEPS={eval_steps}", *_CONTROL_BINDINGS))


# Distillation (Switch Sec. 5): a dense student trained from the Switch teacher's run (the
# teacher's model gin with gin/runs/distill.gin: initialised from its non-expert weights, its
# learning-rate schedule and data stream continued from its last step).
_DISTILL = ("TEACHER_CHECKPOINT='{source}'", "LEARNING_RATE_START_STEP={steps}")
_STUDENT = Stage("distilled dense student", _SWITCH, "distill.gin", _SWITCH.label, _DISTILL,
                 prefix="distilled_")
# The control: the same student trained on the targets alone (DISTILLATION_ALPHA=0), so what the
# teacher's weights bring by themselves is told apart from what its probabilities add.
_INIT_ONLY = dataclasses.replace(
    _STUDENT, label="dense student, teacher's weights, no distillation (alpha 0)",
    bindings=(*_DISTILL, "DISTILLATION_ALPHA=0.0"))
# Seed-to-seed spread of one tiny model's final eval loss (sample_efficiency, docs/results.md): a
# teacher gain below it leaves the share of it a student keeps undefined.
SEED_SPREAD = 0.013

# Sparse upcycling: `steps` more for each run, from the first stage's checkpoints. The dense and
# Switch runs trained on (gin/runs/continue_pretrain.gin: state, step and data position restored,
# so each curve is the run trained for 2x steps); the dense checkpoint upcycled
# (gin/runs/sparse_upcycle.gin: experts copied from the dense MLP, fresh routers, the dense run's
# optimizer state, learning-rate schedule and data stream continued from its last step); the
# same with a fresh optimizer state, and its control: the dense model trained on from its params
# and step alone, with a fresh optimizer state.
_FROM_CHECKPOINT = "INITIAL_CHECKPOINT_PATH='{source}/checkpoint_{steps}'"
_TRAIN_ON = ("TRAIN_STEPS={end}", _FROM_CHECKPOINT)
_DENSE_ON = Stage("dense T5, trained on", _DENSE, "continue_pretrain.gin", _DENSE.label,
                  _TRAIN_ON, end=2, curve="joined")
_SCRATCH_ON = Stage("Switch from scratch", _SWITCH, "continue_pretrain.gin", _SWITCH.label,
                    _TRAIN_ON, end=2, curve="joined")
_UPCYCLE = (_FROM_CHECKPOINT, "LEARNING_RATE_START_STEP={steps}")
_UPCYCLED = Stage("Switch upcycled from the dense checkpoint", _SWITCH, "sparse_upcycle.gin",
                  _DENSE.label, (*_UPCYCLE, "INITIAL_CHECKPOINT_MODE='upcycle'"),
                  prefix="upcycled_", curve="shifted")
_UPCYCLED_FRESH = dataclasses.replace(
    _UPCYCLED, label="Switch upcycled, fresh optimizer state",
    bindings=(*_UPCYCLE, "INITIAL_CHECKPOINT_MODE='upcycle_params'"))
_DENSE_FRESH = Stage("dense T5, trained on with a fresh optimizer state", _DENSE,
                     "continue_pretrain.gin", _DENSE.label,
                     (*_TRAIN_ON, "INITIAL_CHECKPOINT_MODE='params'"), end=2)


_SAMPLE_EFFICIENCY = Claim(
    "Switch vs dense at equal FLOPs per token (multi-domain corpus)",
    "Switch Transformer Fig. 1 / Table 1: Switch-Base reaches the dense model's quality "
    "7x faster", (_DENSE, _SWITCH), seeds=(0, 1), analysis="speedup")
_PARAMS_CONTROL = Claim(
    "Control: Switch vs a dense model with its parameters",
    "Switch Transformer Sec. 3 / Fig. 1: the gain comes from parameters at fixed FLOPs",
    (_DENSE, _SWITCH, _WIDE), analysis="curves")
_DISTILLATION = Claim(
    "MoE-to-dense distillation",
    "Switch Transformer Sec. 5 / Table 6: a dense student distilled from Switch-Base (initialised "
    "from the non-expert weights, teacher weight 0.25) keeps ~30% of the teacher's quality gain "
    "over the same-size dense model", (_DENSE, _SWITCH, _STUDENT, _INIT_ONLY),
    analysis="distillation", listing="dense, Switch teacher, student")

CLAIMS: dict[str, Claim] = {
    "sample_efficiency": _SAMPLE_EFFICIENCY,
    "params_control": _PARAMS_CONTROL,
    "sample_efficiency_stdlib": _stdlib(
        _SAMPLE_EFFICIENCY, "Switch vs dense at equal FLOPs per token (Python stdlib source)",
        "Switch Transformer Fig. 1 on a natural corpus"),
    "params_control_stdlib": _stdlib(
        _PARAMS_CONTROL, "Control: Switch vs a dense model with its parameters (Python stdlib "
        "source)", _PARAMS_CONTROL.paper),
    "num_experts": Claim(
        "More experts at equal FLOPs per token",
        "Switch Transformer Fig. 4: quality improves monotonically with the number of experts",
        tuple(_experts(e) for e in (1, 4, 8, 16, 32)), analysis="experts"),
    "capacity_factor": Claim(
        "Capacity factor (train 1.0 / 1.25 / 2.0, eval 2.0)",
        "Switch Transformer Table 1: more capacity, fewer drops, better per step, slower",
        # cf 1.25 is the switch gins' own: the Switch baseline run.
        tuple(Variant(f"cf {cf}", "switch", () if cf == 1.25 else (f"TRAIN_CAPACITY_FACTOR={cf}",))
              for cf in (1.0, 1.25, 2.0)), analysis="capacity"),
    "routers": Claim(
        "Routers at equal compute: Switch top-1, GShard top-2, expert choice",
        "Switch Transformer Sec. 2.1 (top-1 is enough); Expert Choice (Zhou et al. 2022)",
        (_SWITCH,
         # top-2 doubles expert FLOPs: experts of half the hidden size keep the compute equal.
         Variant("GShard top-2 (experts d_ff/2)", "gshard",
                 scale_bindings=(("tiny", ("EXPERT_MLP_DIM=128",
                                           "TRAIN_CAPACITY_FACTOR=1.25")),)),
         Variant("expert choice (encoder), top-1 (decoder)", "expert_choice")),
        analysis="curves"),
    "load_balance": Claim(
        "Load-balancing loss: weight 0 vs 0.01",
        "Switch Transformer Sec. 2.2: without it the router collapses onto few experts",
        (Variant("aux 0.01", "switch"), Variant("aux 0", "switch", ("AUX_LOSS_FACTOR=0.0",))),
        analysis="balance"),
    "z_loss": Claim(
        "Router z-loss 0 vs 1e-3 at the base learning rate and 2.5x and 5x it",
        "ST-MoE Sec. 3: the z-loss stabilises training without hurting quality",
        tuple(Variant(f"lr x{lr}, z-loss {z}", "switch",
                      ((f"LEARNING_RATE={lr:.1f}",) if lr != 1 else ())
                      + (("ROUTER_Z_LOSS_FACTOR=0.001",) if z else ()))
              for lr in (1, 2.5, 5) for z in (0, "1e-3")),
        analysis="curves"),
    "init_scale": Claim(
        "Initialisation scale 1.0 vs 0.1 (all weights)",
        "Switch Transformer Sec. 2.4 / Table 3: the reduced scale trains more stably",
        (Variant("init 1.0", "switch"), Variant("init 0.1", "switch", ("INIT_SCALE=0.1",))),
        seeds=(0, 1), analysis="curves"),
}
# The same claims on span corruption, where they did not reproduce (docs/results.md).
CLAIMS.update({f"{name}_span": _span(CLAIMS[name])
               for name in ("sample_efficiency", "params_control", "num_experts", "load_balance")})
CLAIMS.update({
    "multilingual": _multilingual(
        "Switch vs dense at equal FLOPs, per language (manual pages)",
        (_DENSE, _SWITCH), (0, 1)),
    "multilingual_span": _multilingual(
        "Switch vs dense at equal FLOPs, per language (manual pages, span corruption)",
        (_DENSE, _SWITCH), (0, 1), "span_corruption"),
    "multilingual_params_control": _multilingual(
        "Control: Switch vs a dense model with its parameters (manual pages)",
        (_DENSE, _SWITCH, _WIDE), (0,)),
    "multilingual_levers": _multilingual(
        "More sparse layers and experts at equal FLOPs (manual pages)",
        (_DENSE, _SWITCH, _EVERY_LAYER_32), (0,)),
    "multilingual_layers": _multilingual(
        "More sparse layers alone at equal FLOPs (manual pages)",
        (_DENSE, _SWITCH, _EVERY_LAYER), (0,)),
    # The third lever: twice the tokens per step (BATCH_SIZE 64), so each expert sees twice
    # the tokens per step and the run twice the data.
    "multilingual_batch": _multilingual(
        "Larger batches (64 rows) at equal FLOPs per token (manual pages)",
        (_DENSE, _SWITCH), (0,), extra=("BATCH_SIZE=64",)),
    # The run length: 3x the steps (the rsqrt schedule does not depend on it, so the first
    # 1,500 steps are the plain claim's); the analysis's by_length tells whether the step ratio
    # falls as the run grows.
    "multilingual_long": dataclasses.replace(_multilingual(
        "3x longer runs: the step ratio by run length (manual pages)",
        (_DENSE, _SWITCH), (0, 1)), steps=4500),
    # The best lever at 1,500 steps (every layer sparse) run as long: its dense runs are
    # multilingual_long's commands, so they are shared with it.
    "multilingual_layers_long": dataclasses.replace(_multilingual(
        "Every layer sparse, 3x longer runs: the step ratio by run length (manual pages)",
        (_DENSE, _EVERY_LAYER), (0, 1)), steps=4500),
    "torch_control_stdlib": _control(
        "PyTorch control on the Python stdlib: HF and moe_jax, same batches",
        "pystdlib_prefix_lm", ("data.get_vocabulary.corpus='pystdlib'",), 20),
    "torch_control_manpages": _control(
        "PyTorch control on the manual pages: HF and moe_jax, same batches",
        "manpages_prefix_lm", (), 4, "manpages.gin"),
    "distillation": _DISTILLATION,
    # On span corruption, where the teacher is no better than the dense model.
    "distillation_span": _span(_DISTILLATION),
    "upcycling": Claim(
        "Sparse upcycling vs continuing the dense model vs an MoE from scratch",
        "Sparse Upcycling (Komatsuzaki et al. 2022), Fig. 2 / 3: for the same extra training, a "
        "dense checkpoint upcycled to an MoE beats both the dense model trained on and an MoE "
        "trained from scratch",
        (_DENSE, _DENSE_ON, _SWITCH, _SCRATCH_ON, _UPCYCLED, _UPCYCLED_FRESH, _DENSE_FRESH),
        analysis="upcycling", listing="dense and Switch, each trained on, and the upcycled dense"),
})


# ---- figures: what each analysis extracts --------------------------------------------------


def steps_to_reach(steps: Sequence[int], loss: Sequence[float], target: float) -> float | None:
  """First step where the (linearly interpolated) eval curve reaches target, or None."""
  for i, (s, l) in enumerate(zip(steps, loss)):
    if l <= target:
      if i == 0:
        return float(s)
      s0, l0 = steps[i - 1], loss[i - 1]
      return s0 + (s - s0) * (l0 - target) / (l0 - l)
  return None


def time_to_reach(dense: dict, run: dict, at: int = -1) -> dict[str, Any] | None:
  """One seed's time to quality, measured: the seconds from the start of run's command to the
  point its eval curve reaches dense's eval loss at eval row `at` (default: the final one;
  interpolated between eval rows, as the step), against dense's seconds to that eval; None
  unless both ran alone (load average < ALONE_LOAD at their start) with row times. ratio:
  run's seconds / dense's."""
  pair = (dense, run)
  if any(r.get("eval_seconds") is None or r.get("load_at_start") is None
         or r["load_at_start"] >= ALONE_LOAD for r in pair):
    return None
  step = steps_to_reach(run["eval_steps"], run["eval_loss"], dense["eval_loss"][at])
  reached = step is not None
  seconds = float(np.interp(step, run["eval_steps"], run["eval_seconds"])) if reached else None
  dense_seconds = dense["eval_seconds"][at]
  return {"step_ratio": step / dense["eval_steps"][at] if reached else None,
          "seconds": seconds, "dense_seconds": dense_seconds,
          "ratio": seconds / dense_seconds if reached else None,
          "load_at_start": [r["load_at_start"] for r in pair]}


def _time_ratio(measured: list[dict | None]) -> float | None:
  """Mean over the seeds measured alone of their time ratios (None where Switch never reached
  the dense final loss or no seed ran alone)."""
  ratios = [m["ratio"] for m in measured if m]
  return float(np.mean(ratios)) if ratios and None not in ratios else None


def _mean_curve(runs: list[dict]) -> tuple[list[int], np.ndarray]:
  return runs[0]["eval_steps"], np.mean([r["eval_loss"] for r in runs], axis=0)


def _per_label(t: Trained, figure: Callable[[dict], float]) -> dict[str, float]:
  """label -> the mean over seeds of figure(one run's summary)."""
  return {label: float(np.mean([figure(r) for r in runs])) for label, runs in t.runs.items()}


def _final_loss(t: Trained) -> dict[str, Any]:
  """Final eval cross-entropy, mean over seeds and per seed: every seeded claim's figures."""
  return {"final_eval_loss": _per_label(t, lambda r: r["final_eval_loss"]),
          "final_eval_loss_per_seed": {label: [r["final_eval_loss"] for r in runs]
                                       for label, runs in t.runs.items()}}


def _speedup(t: Trained) -> dict[str, Any]:
  """Where the sparse model's mean curve reaches the dense model's final loss: the step
  speed-up; the time speed-up measured on the seeds whose two runs each had the machine alone
  (time_to_reach; None when none did)."""
  dense, sparse = t.runs
  steps, dense_curve = _mean_curve(t.runs[dense])
  reach = steps_to_reach(steps, _mean_curve(t.runs[sparse])[1], dense_curve[-1])
  measured = [time_to_reach(d, s) for d, s in zip(t.runs[dense], t.runs[sparse])]
  ratio = _time_ratio(measured)
  return {**_final_loss(t), "steps_to_dense_final": reach,
          "step_speedup": steps[-1] / reach if reach else None,
          "tokens_per_second": _per_label(t, lambda r: r["tokens_per_second"]),
          "time_speedup": 1 / ratio if ratio else None, "time_to_dense_final_alone": measured}


def _capacity(t: Trained) -> dict[str, Any]:
  return {**_final_loss(t),
          "fraction_dropped": _per_label(t, lambda r: r["final_fraction_dropped"]),
          "tokens_per_second": _per_label(t, lambda r: r["tokens_per_second"])}


def _balance(t: Trained) -> dict[str, Any]:
  return {**_final_loss(t), "mean_load_cv": _per_label(t, lambda r: np.mean(r["load_cv"]))}


def _final_xent(t: Trained) -> dict[str, float]:
  return {label: c["eval_xent"][-1] for label, c in t.runs.items()}


def _distillation(t: Trained) -> dict[str, Any]:
  """The share of the teacher's gain over dense the student keeps, (dense - student) /
  (dense - teacher) in final eval cross-entropy; the same without the teacher's probabilities;
  the teacher on its own last n training batches and on the n after them (the student's
  first)."""
  final = _final_xent(t)
  gain = final[_DENSE.label] - final[_SWITCH.label]
  kept = final[_DENSE.label] - final[_STUDENT.label]
  init_only = final[_DENSE.label] - final[_INIT_ONLY.label]
  n = min(20, t.steps)
  teacher, commands = own_batches_xent(t.run(_SWITCH.label), n)
  t.commands += commands
  return {"final_eval_xent": final, "teacher_gain": gain, "student_gain": kept,
          "share_of_teacher_gain_kept": kept / gain if gain > SEED_SPREAD else None,
          "init_only_gain": init_only,
          "share_kept_by_init_alone": init_only / gain if gain > SEED_SPREAD else None,
          "teacher_xent_own_last_batches": teacher["last"],
          "teacher_xent_next_batches": teacher["next"], "own_batches_n": n}


def _upcycling(t: Trained) -> dict[str, Any]:
  """Final eval cross-entropy after 2x steps; the upcycled model against the MoE from scratch
  after the same `steps` of MoE training; the step where the scratch MoE catches up; what a
  fresh optimizer state alone costs, upcycled and dense (params and step kept)."""
  final = _final_xent(t)
  scratch = t.runs[_SCRATCH_ON.label]
  return {
      "final_eval_xent": final,
      "upcycled_gain_over_dense": final[_DENSE_ON.label] - final[_UPCYCLED.label],
      "upcycled_gain_over_scratch": final[_SCRATCH_ON.label] - final[_UPCYCLED.label],
      "fresh_optimizer_cost_upcycled": final[_UPCYCLED_FRESH.label] - final[_UPCYCLED.label],
      "fresh_optimizer_cost_dense": final[_DENSE_FRESH.label] - final[_DENSE_ON.label],
      "scratch_eval_xent_after_same_moe_steps":
          scratch["eval_xent"][scratch["eval_steps"].index(t.steps)],
      "scratch_steps_to_reach_upcycled": steps_to_reach(
          scratch["eval_steps"], scratch["eval_xent"], final[_UPCYCLED.label])}


def _languages(t: Trained) -> dict[str, Any]:
  """Each variant against the first (dense) per task of the mixture (language), means over
  seeds: the final eval cross-entropy gap (dense - variant: > 0 is ahead), per seed too (runs
  of a seed share data and eval batches); in how many languages it is ahead; the step where its
  curve reaches the dense model's final loss, per language and for the mean over languages;
  the wall-clock ratio to that loss, measured per seed on runs that had the machine alone
  (time_to_reach; each run's load average at its start is kept beside it); both ratios by run
  length (by_length: as if the runs had stopped at each eval)."""
  (dense_label, dense), *others = t.runs.items()
  tasks = list(dense[0]["eval_tasks"])
  steps = dense[0]["eval_steps"]
  def curve(runs: list[dict], task: str) -> np.ndarray:
    return np.mean([r["eval_tasks"][task] for r in runs], axis=0)
  dense_final = {task: float(curve(dense, task)[-1]) for task in tasks}
  from moe_jax import evaluation  # pylint: disable=import-outside-toplevel  (jax: only here)
  names = dict(zip(tasks, evaluation.short_task_names(tasks)))
  dense_curve = _mean_curve(dense)[1]
  variants = {}
  for label, runs in others:
    run_curve = _mean_curve(runs)[1]
    gap = {names[k]: dense_final[k] - float(curve(runs, k)[-1]) for k in tasks}
    per_seed = {names[k]: [d["eval_tasks"][k][-1] - r["eval_tasks"][k][-1]
                           for d, r in zip(dense, runs)] for k in tasks}
    reach = {names[k]: steps_to_reach(steps, curve(runs, k), dense_final[k]) for k in tasks}
    overall = steps_to_reach(steps, run_curve, dense_curve[-1])
    measured = [time_to_reach(d, r) for d, r in zip(dense, runs)]
    # The same two ratios had the runs stopped at each earlier eval (the first eval is left
    # out: a curve that starts below the target has no step before it to interpolate from).
    by_length = []
    for j in range(1, len(steps)):
      at = steps_to_reach(steps, run_curve, dense_curve[j])
      times = [time_to_reach(d, r, j) for d, r in zip(dense, runs)]
      by_length.append({"steps": steps[j], "step_ratio": at / steps[j] if at else None,
                        "time_ratio": _time_ratio(times)})
    variants[label] = {
        "languages_ahead": sum(g > 0 for g in gap.values()), "languages": len(gap),
        "mean_gap": float(np.mean(list(gap.values()))), "gap": gap, "gap_per_seed": per_seed,
        "steps_to_dense_final": overall,
        "step_ratio": overall / steps[-1] if overall else None,
        "time_ratio": _time_ratio(measured), "time_to_dense_final_alone": measured,
        "by_length": by_length,
        "steps_to_dense_final_per_language": reach,
        "load_at_start": [r.get("load_at_start") for r in runs]}
  return {**_final_loss(t), "dense": dense_label,
          "dense_final_per_language": {names[k]: v for k, v in dense_final.items()},
          "eval_tokens": {names[k]: dense[0]["eval_task_tokens"][k] for k in tasks},
          "dense_load_at_start": [r.get("load_at_start") for r in dense], "variants": variants}


_HF_LABELS = {"t5_tiny": "HF T5 (PyTorch)", "switch_tiny": "HF Switch (PyTorch)"}


def _torch_control(t: Trained) -> dict[str, Any]:
  """HF's T5 and Switch trained on each seed's batches (claims.hf_control) join the runs;
  Switch's gain over the dense model (dense - Switch final eval xent; > 0: Switch ahead) on each
  side, per seed, and where each Switch reaches its dense model's final loss."""
  hf_runs: dict[str, list[dict]] = {label: [] for label in _HF_LABELS.values()}
  for seed in sorted({p.seed for p in t.planned}):
    result, commands = hf_control(t, seed)
    t.commands += commands
    for run in result["runs"]:
      curve = run["eval_curve"]
      hf_runs[_HF_LABELS[run["model"]]].append({
          "eval_steps": [c["step"] for c in curve], "eval_loss": [c["eval_loss"] for c in curve],
          "final_eval_loss": run["eval_loss"], "train_seconds": run["train_seconds"],
          "tokens_per_second": result["train_tokens"] / run["train_seconds"], "seed": seed})
  moe_jax = {f"moe_jax {label}": runs for label, runs in t.runs.items()}
  (dense, switch), hf = list(moe_jax), list(hf_runs)
  t.runs.clear()
  t.runs.update({**moe_jax, **hf_runs})
  figures = _final_loss(t)
  per_seed = figures["final_eval_loss_per_seed"]
  gains, reach = {}, {}
  for side, (d, s) in {"moe_jax": (dense, switch), "HF": tuple(hf)}.items():
    gains[side] = [a - b for a, b in zip(per_seed[d], per_seed[s])]
    steps, curve = _mean_curve(t.runs[s])
    reach[side] = steps_to_reach(steps, curve, figures["final_eval_loss"][d])
  return {**figures, "switch_gain_per_seed": gains,
          "switch_gain": {side: float(np.mean(g)) for side, g in gains.items()},
          "switch_steps_to_dense_final": reach}


# ---- the Markdown each analysis prints -----------------------------------------------------


def table(report: dict[str, Any]) -> str:
  """A Markdown table of a seeded claim's report (what docs/results.md shows)."""
  f = report["figures"]
  lines = [f"| variant | final eval xent (mean of {len(report['seeds'])} seed(s)) | per seed | "
           "tokens/s | train wall s |", "|---|---|---|---|---|"]
  for label, runs in report["runs"].items():
    tps = np.mean([r["tokens_per_second"] for r in runs])
    secs = [r["train_seconds"] for r in runs if r["train_seconds"]]
    wall = f"{np.mean(secs):.0f}" if secs else "–"
    lines.append(f"| {label} | {f['final_eval_loss'][label]:.4f} | "
                 + ", ".join(f"{x:.4f}" for x in f["final_eval_loss_per_seed"][label])
                 + f" | {tps:.0f} | {wall} |")
  extra = {k: v for k, v in f.items() if not k.startswith("final_eval_loss")}
  if extra:
    lines.append("")
    lines += [f"- {k}: {json.dumps(v)}" for k, v in extra.items()]
  return "\n".join(lines)


def _languages_text(report: dict[str, Any]) -> str:
  """The per-language table (gap = dense - variant, > 0: ahead) and each variant's summary."""
  f, steps = report["figures"], report["steps"]
  labels = list(f["variants"])
  lines = ["| language | eval tokens | " + f["dense"] + " | "
           + " | ".join(f"gap: {l}" for l in labels) + " |", "|---" * (3 + len(labels)) + "|"]
  for lang, loss in f["dense_final_per_language"].items():
    lines.append(f"| {lang} | {f['eval_tokens'][lang]:.0f} | {loss:.4f} | "
                 + " | ".join(f"{f['variants'][l]['gap'][lang]:+.4f}" for l in labels) + " |")
  lines.append("")
  for label, v in f["variants"].items():
    reach = v["steps_to_dense_final"]
    lines.append(
        f"- {label}: ahead in {v['languages_ahead']} of {v['languages']} languages, mean gap "
        f"{v['mean_gap']:+.4f} nats; mean over languages {f['final_eval_loss'][label]:.4f} vs "
        f"{f['final_eval_loss'][f['dense']]:.4f}; reaches the dense final loss "
        + (f"at step {reach:.0f} ({v['step_ratio']:.2f} of the steps)" if reach
           else f"not within {steps} steps"))
    for seed, m in zip(report["seeds"], v["time_to_dense_final_alone"]):
      if m:  # a seed whose two runs had the machine alone
        lines.append(
            f"  - seed {seed}, alone (load {m['load_at_start'][0]:.2f} / "
            f"{m['load_at_start'][1]:.2f}): dense {m['dense_seconds']:.0f} s to its final eval; "
            + (f"{label} reaches that loss at {m['step_ratio']:.2f} of the steps and "
               f"{m['seconds']:.0f} s, **{m['ratio']:.2f} of the wall-clock**" if m["ratio"]
               else f"{label} does not reach it"))
    lines.append("  - by run length (steps: step ratio / wall-clock ratio alone): " + ", ".join(
        f"{b['steps']}: " + " / ".join("-" if x is None else f"{x:.2f}"
                                       for x in (b["step_ratio"], b["time_ratio"]))
        for b in v["by_length"]))
  return "\n".join(lines)


def _language_bars(ax, runs: dict[str, list[dict]]) -> None:
  """Per language: each variant's final eval gap to the first (dense) variant, one bar per
  seed-mean with the seeds as dots."""
  (_, dense), *others = runs.items()
  tasks = list(dense[0]["eval_tasks"])
  from moe_jax import evaluation  # pylint: disable=import-outside-toplevel  (jax: only here)
  names = dict(zip(tasks, evaluation.short_task_names(tasks)))
  x = np.arange(len(tasks))
  width = 0.8 / max(len(others), 1)
  for i, (label, seeds) in enumerate(others):
    gaps = np.array([[d["eval_tasks"][k][-1] - r["eval_tasks"][k][-1] for k in tasks]
                     for d, r in zip(dense, seeds)])
    pos = x + (i - (len(others) - 1) / 2) * width
    ax.bar(pos, gaps.mean(0), width, color=f"C{i + 1}", label=label)
    for g in gaps:
      ax.plot(pos, g, ".", color="k", ms=2)
  ax.axhline(0, color="gray", lw=0.8)
  ax.set_xticks(x, [names[k] for k in tasks], rotation=90)
  ax.set(ylabel="dense - variant, final eval xent (> 0: ahead)",
         title="Per language: gain over the dense model")
  ax.legend(fontsize=7)


def _final_table(final: dict[str, float], column: str) -> list[str]:
  return [f"| model | {column} |", "|---|---|", *[f"| {l} | {x:.4f} |" for l, x in final.items()]]


def _distillation_text(report: dict[str, Any]) -> str:
  f = report["figures"]
  share, n = f["share_of_teacher_gain_kept"], f["own_batches_n"]
  return "\n".join(_final_table(f["final_eval_xent"], "final eval xent") + [
      "", f"- teacher's gain over dense: {f['teacher_gain']:+.4f} nats; student's: "
      f"{f['student_gain']:+.4f} nats; "
      + (f"share kept: {share:.0%}" if share is not None else
         f"share kept: undefined (the teacher's gain is not above the seed-to-seed "
         f"spread, {SEED_SPREAD})"),
      f"- without the teacher's probabilities (alpha 0): {f['init_only_gain']:+.4f} nats",
      f"- the teacher on its last {n} training batches: {f['teacher_xent_own_last_batches']:.4f}"
      f"; on the {n} after them (the student's first): {f['teacher_xent_next_batches']:.4f}"])


def _distillation_title(claim: Claim, figures: dict[str, Any]) -> str:
  share = figures["share_of_teacher_gain_kept"]
  return claim.title + (f": student keeps {share:.0%} of the teacher's gain"
                        if share is not None else ": the teacher's gain is within the seed spread")


def _upcycling_text(report: dict[str, Any]) -> str:
  f, steps = report["figures"], report["steps"]
  final, reach = f["final_eval_xent"], f["scratch_steps_to_reach_upcycled"]
  return "\n".join(_final_table(final, f"eval xent at step {2 * steps}") + [
      "", f"- upcycled vs dense trained on: {f['upcycled_gain_over_dense']:+.4f} nats; vs "
      f"Switch from scratch: {f['upcycled_gain_over_scratch']:+.4f}",
      f"- after the same {steps} MoE steps: upcycled {final[_UPCYCLED.label]:.4f}, scratch "
      f"{f['scratch_eval_xent_after_same_moe_steps']:.4f}; the scratch MoE reaches the "
      "upcycled loss " + (f"at step {reach:.0f}" if reach is not None else
                          f"not within {2 * steps} steps"),
      f"- a fresh optimizer state costs the upcycled model "
      f"{f['fresh_optimizer_cost_upcycled']:+.4f} nats, the dense model trained on "
      f"{f['fresh_optimizer_cost_dense']:+.4f}"])


# ---- plots ---------------------------------------------------------------------------------


def _experts_panel(ax, runs: dict[str, list[dict]]) -> None:
  experts = [1 if "dense" in l else int(l.split()[0]) for l in runs]
  ax.plot(experts, [np.mean([r["final_eval_loss"] for r in seeds]) for seeds in runs.values()],
          marker="o")
  ax.set(xscale="log", xlabel="experts (1 = dense)", ylabel="final eval cross-entropy",
         title="Eval loss vs experts at equal FLOPs")
  ax.set_xticks(experts, [str(e) for e in experts])


def _during_training(key: str, name: str) -> Callable[[Any, dict[str, list[dict]]], None]:
  """A panel of run_summary's `key` (a per-stats-period curve), mean over seeds, per label."""
  def panel(ax, runs: dict[str, list[dict]]) -> None:
    for i, (label, seeds) in enumerate(runs.items()):
      ax.plot(seeds[0]["train_steps"], np.mean([r[key] for r in seeds], axis=0),
              color=f"C{i}", label=label)
    ax.set(xlabel="step", ylabel=name, title=f"{name[0].upper()}{name[1:]} during training")
    ax.legend()
  return panel


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _plot_seeds(claim: Claim, runs: dict[str, list[dict]], panel, path: str) -> None:
  """Every seed's eval curve and their mean per label; beside it the analysis' panel, if any."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(12 if panel else 6.5, 4),
                           squeeze=False, layout="constrained")
  ax = axes[0, 0]
  for i, (label, seeds) in enumerate(runs.items()):
    for r in seeds:
      ax.plot(r["eval_steps"], r["eval_loss"], color=f"C{i}", alpha=0.25, lw=0.8)
    steps, curve = _mean_curve(seeds)
    ax.plot(steps, curve, color=f"C{i}", label=f"{label} ({len(seeds)} seed"
            f"{'s' if len(seeds) > 1 else ''})", marker=".")
  ax.set(xlabel="step", ylabel="eval cross-entropy (nats/token)", title=claim.title)
  ax.grid(alpha=0.3)
  ax.legend()
  if panel:
    panel(axes[0, 1], runs)
    axes[0, 1].grid(alpha=0.3)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_curves(curves: dict[str, dict], title: str, vline: int | None, path: str) -> None:
  """A staged claim's eval curves (vline: where the second stage starts)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
  for i, (label, c) in enumerate(curves.items()):
    ax.plot(c["eval_steps"], c["eval_xent"], marker=".", color=f"C{i}",
            label=f"{label}: {c['eval_xent'][-1]:.4f}")
  if vline is not None:
    ax.axvline(vline, color="gray", linestyle=":")
  ax.set(xlabel="step", ylabel="eval cross-entropy (nats/token)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Analysis:
  """What a claim compares: its figures, the Markdown it prints (from its report) and its plot:
  a seeded claim's eval curves and `panel` beside them; a staged claim's curves under `title`
  (claim, figures -> str)."""
  figures: Callable[[Trained], dict[str, Any]]
  text: Callable[[dict[str, Any]], str] = table
  panel: Callable[[Any, dict[str, list[dict]]], None] | None = None
  title: Callable[[Claim, dict[str, Any]], str] = lambda claim, figures: claim.title


ANALYSES = {
    "curves": Analysis(_final_loss),
    "speedup": Analysis(_speedup),
    "experts": Analysis(_final_loss, panel=_experts_panel),
    "capacity": Analysis(_capacity,
                         panel=_during_training("fraction_dropped", "fraction of tokens dropped")),
    "balance": Analysis(_balance, panel=_during_training("load_cv", "expert-load CV")),
    "distillation": Analysis(_distillation, _distillation_text, title=_distillation_title),
    "languages": Analysis(_languages, _languages_text, panel=_language_bars),
    "torch_control": Analysis(_torch_control),
    "upcycling": Analysis(_upcycling, _upcycling_text, title=lambda *_: (
        "Sparse upcycling (dotted line: the dense checkpoint upcycled)")),
}


# ---- running a claim -----------------------------------------------------------------------


def reproduce(name: str, *, seeds: Sequence[int] | None = None, steps: int | None = None,
              scale: str = "tiny", quick: bool = False, runs_dir: str, out: str,
              alone: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or reuses) every run of claim `name`; writes <out>/<name>.json and .png
  (<name>_<scale>.* off the tiny scale), prints its Markdown, returns its report. A staged
  claim takes the first seed."""
  claim = CLAIMS[name]
  analysis = ANALYSES[claim.analysis]
  seeds = tuple(seeds) if seeds else claim.seeds
  seeds = seeds[:1] if claim.staged else seeds
  steps = steps or (60 if quick else claim.steps)
  trained = train(name, claim, plan(claim, seeds, steps, scale, quick, runs_dir), steps, alone)
  figures = analysis.figures(trained)
  report = {
      "claim": name, "title": claim.title, "paper": claim.paper, "task": claim.task,
      "steps": steps, "seeds": list(seeds), "scale": "tiny" if quick else scale, "quick": quick,
      "python_version": platform.python_version(), "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "commands": trained.commands, "figures": figures,
      "runs": trained.runs,
  }
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, name if scale == "tiny" or quick else f"{name}_{scale}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  if claim.staged:
    shifted = any(isinstance(v, Stage) and v.curve != "own" for v in claim.variants)
    _plot_curves(trained.runs, analysis.title(claim, figures), steps if shifted else None,
                 stem + ".png")
  else:
    _plot_seeds(claim, trained.runs, analysis.panel, stem + ".png")
  log(analysis.text(report))
  return report


def _listing(claim: Claim) -> str:
  """What --list says of a claim's runs."""
  if not claim.staged:
    return (f"{len(claim.variants)} variants x {len(claim.seeds)} seed(s), {claim.steps} steps "
            f"on {claim.task}")
  end = max(v.end for v in claim.variants if isinstance(v, Stage))
  steps = f"{end}x{claim.steps}" if end > 1 else claim.steps
  return f"{claim.listing}; seed {claim.seeds[0]}, {steps} steps on {claim.task}"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
  parser.add_argument("claim", nargs="?", help="one of --list")
  parser.add_argument("--list", action="store_true", help="list the claims")
  parser.add_argument("--seeds", type=int, nargs="+")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--scale", choices=SCALES, default="tiny",
                      help="model size: gin/models/<stem>_<scale>.gin")
  parser.add_argument("--quick", action="store_true", help="smoke-sized runs (not results)")
  parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "reproduce"))
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  parser.add_argument("--alone", action="store_true",
                      help=f"start each run once the machine is idle (1-minute load average "
                           f"< {ALONE_LOAD}), so its seconds count as measured alone")
  args = parser.parse_args(argv)
  if args.list or not args.claim:
    for name, claim in CLAIMS.items():
      print(f"{name:25s} {claim.title} ({_listing(claim)})")
    return 0
  if args.claim not in CLAIMS:
    parser.error(f"claim: unknown {args.claim!r}; one of {', '.join(CLAIMS)}")
  reproduce(args.claim, seeds=args.seeds, steps=args.steps, scale=args.scale, quick=args.quick,
            runs_dir=args.runs_dir, out=args.out, alone=args.alone)
  return 0


if __name__ == "__main__":
  sys.exit(main())
