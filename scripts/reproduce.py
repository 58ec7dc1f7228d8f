"""Paper claims at CPU scale, one command each: trains the variants, writes JSON + a plot.

  python scripts/reproduce.py --list
  python scripts/reproduce.py sample_efficiency [--seeds 0 1 2] [--steps 3000] [--scale mini]

Every run is `python -m moe_jax.train` with the claim's gin files and bindings, in its own
MODEL_DIR under --runs_dir (default runs/reproduce/<model>_<hash of the command>); a finished
run is not trained again (its metrics reach the last step), so claims share their common runs
and re-running a command only redoes the analysis. Results go to --out (default docs/results): <claim>.json (every
curve, the figures, the commands, seeds, wall times and the Python version of the data) and
<claim>.png (<claim>_mini.* at --scale mini); it prints the Markdown table that docs/results.md
shows.

--quick shrinks a claim to a smoke-sized run on the tiny models (the test suite checks the
direction of the robust effects this way); its figures are not results.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model set-up of a claim: a label, a model gin stem (`switch` -> gin/models/switch_<scale>
  .gin) and gin bindings (NAME=VALUE), plus bindings that only apply at one scale."""
  label: str
  stem: str
  bindings: tuple[str, ...] = ()
  scale_bindings: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper claim: its variants, the task, the run length and what to compare."""
  title: str
  paper: str
  variants: tuple[Variant, ...]
  task: str = "multidomain_prefix_lm"
  steps: int = 1500
  seeds: tuple[int, ...] = (0,)
  bindings: tuple[str, ...] = ("TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",)
  analysis: str = "curves"  # curves | speedup | experts | capacity | balance


# Scales: 'tiny' (d_model 128, 2+2 layers, 8 experts: ~5 min per 1500 steps on 2 cores) and
# 'mini' (d_model 256, 4+4 layers, 16 experts: ~8x the compute).
SCALES = ("tiny", "mini")
# CPU-length runs: the T5 schedule with 1k warmup steps (lr 0.032, then 1/sqrt(step)) instead
# of 10k (a constant 0.01 for the whole run), which learns faster at this length.
COMMON_BINDINGS = ("WARMUP_STEPS=1000",)
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


_SAMPLE_EFFICIENCY = Claim(
    "Switch vs dense at equal FLOPs per token (multi-domain corpus)",
    "Switch Transformer Fig. 1 / Table 1: Switch-Base reaches the dense model's quality "
    "7x faster", (_DENSE, _SWITCH), seeds=(0, 1), analysis="speedup")
_PARAMS_CONTROL = Claim(
    "Control: Switch vs a dense model with its parameters",
    "Switch Transformer Sec. 3 / Fig. 1: the gain comes from parameters at fixed FLOPs",
    (_DENSE, _SWITCH, _WIDE), analysis="curves")

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


# ---- running ---------------------------------------------------------------------------------


def _run_dir(runs_dir: str, cmd: Sequence[str]) -> str:
  """A run's MODEL_DIR, named by its gin file and a hash of its command: claims that share a
  run (e.g. the Switch baseline) train it once."""
  gin_file = next(a for a in cmd if a.startswith("--gin_file=gin/models/"))
  stem = os.path.basename(gin_file).removesuffix(".gin")
  key = hashlib.sha256("\0".join(a for a in cmd[1:] if "MODEL_DIR" not in a).encode())
  return os.path.join(runs_dir, f"{stem}_{key.hexdigest()[:10]}")


def train_command(claim: Claim, variant: Variant, seed: int, steps: int, scale: str,
                  quick: bool) -> list[str]:
  """The `python -m moe_jax.train` command of one run (--quick: tiny models, small batches)."""
  scale = "tiny" if quick else scale
  bindings = [*COMMON_BINDINGS, f"TRAIN_STEPS={steps}", f"RANDOM_SEED={seed}",
              f"MIXTURE_OR_TASK_NAME='{claim.task}'", f"EVAL_PERIOD={max(steps // 10, 1)}",
              "EVAL_STEPS=20", f"CHECKPOINT_PERIOD={steps}", "KEEP_CHECKPOINTS=1",
              f"STATS_PERIOD={max(steps // 100, 1)}"]
  bindings += [*claim.bindings, *variant.bindings, *dict(variant.scale_bindings).get(scale, ())]
  if quick:  # last: gin takes the last binding of a name
    bindings += ["BATCH_SIZE=16", "EVAL_STEPS=4",
                 "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
  return [sys.executable, "-m", "moe_jax.train", f"--gin_file=gin/models/{variant.stem}_{scale}.gin",
          "--gin_file=gin/runs/pretrain.gin", *[f"--gin.{b}" for b in bindings]]


def with_model_dir(cmd: Sequence[str], model_dir: str) -> list[str]:
  return [*cmd, f"--gin.MODEL_DIR='{model_dir}'"]


def display_command(cmd: Sequence[str]) -> str:
  """A run's command as a person would type it from the repo root: `python`, paths relative to
  the root, gin strings inside double quotes."""
  def quote(arg: str) -> str:
    arg = arg.replace(_ROOT + os.sep, "")
    if not any(c in arg for c in "\"$`\\") and "'" in arg:
      return f'"{arg}"'
    return shlex.quote(arg)
  return " ".join(["python", *map(quote, cmd[1:])])


def read_metrics(model_dir: str) -> tuple[list[dict], list[dict]]:
  """metrics.jsonl -> (train rows, eval rows), one row per step (the last one written)."""
  rows: dict[tuple[str, int], dict] = {}
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[(row.get("split", "train"), row["step"])] = row
  train = [r for (split, _), r in sorted(rows.items()) if split == "train"]
  evals = [r for (split, _), r in sorted(rows.items()) if split == "eval"]
  return train, evals


def _finished(model_dir: str, steps: int) -> bool:
  try:
    train, _ = read_metrics(model_dir)
  except FileNotFoundError:
    return False
  return bool(train) and train[-1]["step"] >= steps


def run_one(cmd: Sequence[str], model_dir: str, steps: int) -> float | None:
  """Trains unless finished; returns the wall seconds of the command (kept in MODEL_DIR/
  wall_seconds, so a later analysis still has them; None if unknown)."""
  seconds_file = os.path.join(model_dir, "wall_seconds")
  if not _finished(model_dir, steps):
    os.makedirs(model_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(model_dir, "train.log"), "w") as log:
      result = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
      raise SystemExit(f"reproduce.py: error: run failed ({result.returncode}); see "
                       f"{os.path.join(model_dir, 'train.log')}: {shlex.join(cmd)}")
    with open(seconds_file, "w") as f:
      f.write(f"{time.time() - start:.1f}\n")
  if not os.path.exists(seconds_file):
    return None
  with open(seconds_file) as f:
    return float(f.read())


# ---- analysis --------------------------------------------------------------------------------


def _eval_key(row: dict) -> str:
  # Cross-entropy, as the papers compare: an MoE model's total loss adds its load-balance and
  # router z-losses (~0.01 here), which would bias every comparison against it.
  return next(k for k in row if k.startswith("eval/") and k.endswith("/cross_ent_loss"))


def run_summary(model_dir: str, seconds: float | None) -> dict[str, Any]:
  """Curves and end-of-run figures of one finished run."""
  train, evals = read_metrics(model_dir)
  moe_keys = sorted({k.rsplit("/", 1)[0] for k in train[-1] if k.startswith("moe/")})
  loads = [np.array([r[f"{k}/expert_load"] for r in train]) for k in moe_keys]
  summary = {
      "eval_steps": [r["step"] for r in evals],
      "eval_loss": [r[_eval_key(r)] for r in evals],
      "train_steps": [r["step"] for r in train],
      "train_xent": [r["cross_ent_loss"] for r in train],
      "final_eval_loss": evals[-1][_eval_key(evals[-1])],
      "tokens_per_second": float(np.median([r["tokens_per_second"] for r in train
                                            if "tokens_per_second" in r])),
      "train_seconds": seconds,
  }
  if moe_keys:
    drops = [np.mean([r[f"{k}/fraction_dropped"] for k in moe_keys]) for r in train]
    # Coefficient of variation of the expert load, mean over MoE layers, per stats period.
    cv = np.mean([load.std(-1) / load.mean(-1) for load in loads], axis=0)
    summary.update(fraction_dropped=[float(d) for d in drops], load_cv=cv.tolist(),
                   final_fraction_dropped=float(np.mean(drops[-10:])),
                   router_confidence=float(np.mean(
                       [train[-1][f"{k}/router_confidence"] for k in moe_keys])))
  return summary


def steps_to_reach(steps: Sequence[int], loss: Sequence[float], target: float) -> float | None:
  """First step where the (linearly interpolated) eval curve reaches target, or None."""
  for i, (s, l) in enumerate(zip(steps, loss)):
    if l <= target:
      if i == 0:
        return float(s)
      s0, l0 = steps[i - 1], loss[i - 1]
      return s0 + (s - s0) * (l0 - target) / (l0 - l)
  return None


def _mean_curve(runs: list[dict]) -> tuple[list[int], np.ndarray]:
  return runs[0]["eval_steps"], np.mean([r["eval_loss"] for r in runs], axis=0)


def figures(claim: Claim, results: dict[str, list[dict]]) -> dict[str, Any]:
  """The claim's headline figures from the runs (label -> one summary per seed)."""
  final = {label: float(np.mean([r["final_eval_loss"] for r in runs]))
           for label, runs in results.items()}
  out: dict[str, Any] = {"final_eval_loss": final,
                         "final_eval_loss_per_seed": {l: [r["final_eval_loss"] for r in runs]
                                                      for l, runs in results.items()}}
  labels = list(results)
  if claim.analysis == "speedup":
    dense, sparse = labels
    steps, dense_curve = _mean_curve(results[dense])
    _, sparse_curve = _mean_curve(results[sparse])
    reach = steps_to_reach(steps, sparse_curve, dense_curve[-1])
    out["steps_to_dense_final"] = reach
    out["step_speedup"] = steps[-1] / reach if reach else None
    tps = {l: np.mean([r["tokens_per_second"] for r in runs]) for l, runs in results.items()}
    out["tokens_per_second"] = {l: float(v) for l, v in tps.items()}
    out["time_speedup"] = (out["step_speedup"] * tps[sparse] / tps[dense]
                           if reach else None)
  if claim.analysis == "capacity":
    out["fraction_dropped"] = {l: float(np.mean([r["final_fraction_dropped"] for r in runs]))
                               for l, runs in results.items()}
    out["tokens_per_second"] = {l: float(np.mean([r["tokens_per_second"] for r in runs]))
                                for l, runs in results.items()}
  if claim.analysis == "balance":
    out["mean_load_cv"] = {l: float(np.mean([np.mean(r["load_cv"]) for r in runs]))
                           for l, runs in results.items()}
  return out


def plot(claim: Claim, results: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  extra = claim.analysis in ("experts", "capacity", "balance")
  fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 6.5, 4),
                           squeeze=False, layout="constrained")
  ax = axes[0, 0]
  for i, (label, runs) in enumerate(results.items()):
    for r in runs:
      ax.plot(r["eval_steps"], r["eval_loss"], color=f"C{i}", alpha=0.25, lw=0.8)
    steps, curve = _mean_curve(runs)
    ax.plot(steps, curve, color=f"C{i}", label=f"{label} ({len(runs)} seed"
            f"{'s' if len(runs) > 1 else ''})", marker=".")
  ax.set(xlabel="step", ylabel="eval cross-entropy (nats/token)", title=claim.title)
  ax.grid(alpha=0.3)
  ax.legend()
  if extra:
    ax = axes[0, 1]
    if claim.analysis == "experts":
      experts = [1 if "dense" in l else int(l.split()[0]) for l in results]
      ax.plot(experts, [np.mean([r["final_eval_loss"] for r in runs])
                        for runs in results.values()], marker="o")
      ax.set(xscale="log", xlabel="experts (1 = dense)", ylabel="final eval cross-entropy",
             title="Eval loss vs experts at equal FLOPs")
      ax.set_xticks(experts, [str(e) for e in experts])
    else:
      key, name = (("fraction_dropped", "fraction of tokens dropped")
                   if claim.analysis == "capacity" else ("load_cv", "expert-load CV"))
      for i, (label, runs) in enumerate(results.items()):
        ax.plot(runs[0]["train_steps"], np.mean([r[key] for r in runs], axis=0),
                color=f"C{i}", label=label)
      ax.set(xlabel="step", ylabel=name, title=f"{name[0].upper()}{name[1:]} during training")
      ax.legend()
    ax.grid(alpha=0.3)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(claim_name: str, report: dict[str, Any]) -> str:
  """A Markdown table of a claim's report (what docs/results.md shows)."""
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


def reproduce(name: str, *, seeds: Sequence[int] | None = None, steps: int | None = None,
              scale: str = "tiny", quick: bool = False, runs_dir: str, out: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or reuses) every run of claim `name`, writes <out>/<name>.json and .png."""
  claim = CLAIMS[name]
  seeds = tuple(seeds) if seeds else claim.seeds
  steps = steps or (60 if quick else claim.steps)
  results: dict[str, list[dict]] = {}
  commands = []
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  jobs = [(v, s) for v in claim.variants for s in seeds]
  for variant, seed in tqdm(jobs, desc=name, unit="run"):
    cmd = train_command(claim, variant, seed, steps, scale, quick)
    model_dir = _run_dir(runs_dir, cmd)
    cmd = with_model_dir(cmd, model_dir)
    commands.append(display_command(cmd))
    seconds = run_one(cmd, model_dir, steps)
    results.setdefault(variant.label, []).append(run_summary(model_dir, seconds))
  report, stem = _save_report(name, claim, seeds=seeds, steps=steps, scale=scale, quick=quick,
                              commands=commands, figures=figures(claim, results), runs=results,
                              out=out)
  plot(claim, results, stem + ".png")
  log(table(name, report))
  return report


def _save_report(name: str, claim: Claim, *, seeds: Sequence[int], steps: int, scale: str,
                 quick: bool, commands: list[str], figures: dict[str, Any], runs: dict,
                 out: str) -> tuple[dict[str, Any], str]:
  """Writes <out>/<name>.json (<name>_<scale> off the tiny scale); returns it and the path stem
  for the plot."""
  report = {
      "claim": name, "title": claim.title, "paper": claim.paper, "task": claim.task,
      "steps": steps, "seeds": list(seeds), "scale": "tiny" if quick else scale, "quick": quick,
      "python_version": platform.python_version(), "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "commands": commands, "figures": figures, "runs": runs,
  }
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, name if scale == "tiny" or quick else f"{name}_{scale}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  return report, stem


# ---- two-stage claims: distillation (Switch Sec. 5) and sparse upcycling ---------------------


def _stage_command(claim: Claim, variant: Variant, run_gin: str, seed: int, steps: int,
                   scale: str, quick: bool, *extra: str) -> list[str]:
  """A run of `variant` with gin/runs/<run_gin> in place of pretrain.gin, the claim's other
  settings and `extra` bindings (last, so they win)."""
  cmd = [a.replace("gin/runs/pretrain.gin", f"gin/runs/{run_gin}")
         for a in train_command(claim, variant, seed, steps, scale, quick)]
  return cmd + [f"--gin.{b}" for b in extra]


def _baseline_runs(claim: Claim, seed: int, steps: int, scale: str, quick: bool,
                   runs_dir: str) -> dict[str, tuple[list[str], str, int]]:
  """label -> (command, MODEL_DIR, final step) of the claim's pre-training runs (the same runs
  as sample_efficiency's)."""
  runs = {}
  for variant in claim.variants:
    cmd = train_command(claim, variant, seed, steps, scale, quick)
    model_dir = _run_dir(runs_dir, cmd)
    runs[variant.label] = (with_model_dir(cmd, model_dir), model_dir, steps)
  return runs


def _eval_xent(model_dir: str) -> tuple[list[int], list[float]]:
  """Eval cross-entropy curve (the aux and z-losses left out: the models' quality alone)."""
  _, evals = read_metrics(model_dir)
  return [r["step"] for r in evals], [r[_eval_key(r)] for r in evals]


def _train_stages(name: str, runs: dict[str, tuple[list[str], str, int]]
                  ) -> tuple[dict[str, dict], list[str]]:
  """Trains (or reuses) each run in order; label -> eval curve and wall seconds, and the
  commands as typed."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  curves, commands = {}, []
  for label, (cmd, model_dir, final_step) in tqdm(runs.items(), desc=name, unit="run"):
    commands.append(display_command(cmd))
    seconds = run_one(cmd, model_dir, final_step)
    eval_steps, xent = _eval_xent(model_dir)
    curves[label] = {"eval_steps": eval_steps, "eval_xent": xent, "train_seconds": seconds}
  return curves, commands


def _write_staged(name: str, claim: Claim, *, seed: int, steps: int, scale: str, quick: bool,
                  commands: list[str], figures: dict[str, Any], curves: dict[str, dict],
                  out: str, title: str, vline: int | None = None) -> dict[str, Any]:
  """<out>/<name>.json (as reproduce()'s) and .png (every eval curve; vline: where the second
  stage starts)."""
  report, stem = _save_report(name, claim, seeds=[seed], steps=steps, scale=scale, quick=quick,
                              commands=commands, figures=figures, runs=curves, out=out)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
  for i, (label, c) in enumerate(curves.items()):
    ax.plot(c["eval_steps"], c["eval_xent"], marker=".", color=f"C{i}",
            label=f"{label}: {c['eval_xent'][-1]:.4f}")
  if vline is not None:
    ax.axvline(vline, color="gray", linestyle=":")
  ax.set(xlabel="step", ylabel="eval cross-entropy (nats/token)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(stem + ".png", dpi=110)
  plt.close(fig)
  return report


DISTILLATION = Claim(
    "MoE-to-dense distillation",
    "Switch Transformer Sec. 5 / Table 6: a dense student distilled from Switch-Base (initialised "
    "from the non-expert weights, teacher weight 0.25) keeps ~30% of the teacher's quality gain "
    "over the same-size dense model", (_DENSE, _SWITCH))
# The same on span corruption, where the teacher is no better than the dense model.
DISTILLATION_SPAN = _span(DISTILLATION)
_STUDENT = "distilled dense student"
# The control: the same student trained on the targets alone (DISTILLATION_ALPHA=0), so what the
# teacher's weights bring by themselves is told apart from what its probabilities add.
_INIT_ONLY = "dense student, teacher's weights, no distillation (alpha 0)"
# Seed-to-seed spread of one tiny model's final eval loss (sample_efficiency, docs/results.md): a
# teacher gain below it leaves the share of it a student keeps undefined.
SEED_SPREAD = 0.013


# The settings of a training command that eval.gin also has (the model's data and batches).
_EVAL_SETTINGS = ("MIXTURE_OR_TASK_NAME=", "TASK_FEATURE_LENGTHS=", "BATCH_SIZE=", "RANDOM_SEED=",
                  "data.")


def own_batches_xent(cmd: Sequence[str], model_dir: str, steps: int, n: int
                     ) -> tuple[dict[str, float], list[str]]:
  """A finished run's cross-entropy on the last n batches it trained on and on the n batches
  after them (`moe_jax.eval` with TRAIN_BATCHES_FROM), and the two commands as typed.

  What a model keeps of its latest batches: a distillation student that reads the teacher's
  training stream again would end on batches whose targets the teacher still remembers.
  """
  task = next(a.split("=", 1)[1].strip("'") for a in cmd if a.startswith(
      "--gin.MIXTURE_OR_TASK_NAME="))
  base = [sys.executable, "-m", "moe_jax.eval",
          next(a for a in cmd if a.startswith("--gin_file=gin/models/")),
          "--gin_file=gin/runs/eval.gin",
          *[a for a in cmd if a.startswith("--gin.") and a[6:].startswith(_EVAL_SETTINGS)],
          f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.EVAL_STEPS={n}"]
  xent, commands = {}, []
  for label, start in (("last", steps - n), ("next", steps)):
    out_dir = os.path.join(model_dir, f"train_batches_from_{start}")
    eval_cmd = [*base, f"--gin.TRAIN_BATCHES_FROM={start}", f"--gin.EVAL_OUTPUT_DIR='{out_dir}'"]
    results = os.path.join(out_dir, "eval_results.json")
    if not os.path.exists(results):
      done = subprocess.run(eval_cmd, cwd=_ROOT, capture_output=True, text=True, check=False)
      if done.returncode:
        raise SystemExit(f"reproduce.py: error: eval failed ({done.returncode}): "
                         f"{shlex.join(eval_cmd)}\n{done.stderr[-2000:]}")
    with open(results) as f:
      xent[label] = json.load(f)[f"{task}/cross_ent_loss"]
    commands.append(display_command(eval_cmd))
  return xent, commands


def distillation_commands(claim: Claim, seed: int, steps: int, scale: str, quick: bool,
                          runs_dir: str) -> dict[str, tuple[list[str], str, int]]:
  """label -> (command, MODEL_DIR, final step) of the dense baseline, the Switch teacher, the
  student (the teacher's model gin with gin/runs/distill.gin, otherwise the baseline's settings
  and steps; the teacher's learning-rate schedule and data stream continued from its last step:
  its weights start from there) and the student's control without the teacher's
  probabilities."""
  runs = _baseline_runs(claim, seed, steps, scale, quick, runs_dir)
  teacher_dir = runs[_SWITCH.label][1]
  cmd = _stage_command(claim, _SWITCH, "distill.gin", seed, steps, scale, quick,
                       f"TEACHER_CHECKPOINT='{teacher_dir}'",
                       f"LEARNING_RATE_START_STEP={steps}")
  student_dir = os.path.join(runs_dir, "distilled_" + os.path.basename(_run_dir(runs_dir, cmd)))
  runs[_STUDENT] = (with_model_dir(cmd, student_dir), student_dir, steps)
  cmd = [*cmd, "--gin.DISTILLATION_ALPHA=0.0"]
  control_dir = os.path.join(runs_dir, "distilled_" + os.path.basename(_run_dir(runs_dir, cmd)))
  runs[_INIT_ONLY] = (with_model_dir(cmd, control_dir), control_dir, steps)
  return runs


def reproduce_distillation(name: str = "distillation", *, seed: int = 0,
                           steps: int | None = None, scale: str = "tiny", quick: bool = False,
                           runs_dir: str, out: str,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or reuses) the dense model, the teacher and then the student; writes
  <out>/<name>.json and .png with the share of the teacher's gain the student keeps:
  (dense - student) / (dense - teacher) in final eval cross-entropy. name: 'distillation'
  (prefix LM, as the other claims) or 'distillation_span'."""
  claim = DISTILLATION_SPAN if name == "distillation_span" else DISTILLATION
  steps = steps or (60 if quick else claim.steps)
  runs = distillation_commands(claim, seed, steps, scale, quick, runs_dir)
  curves, commands = _train_stages(name, runs)
  final = {label: c["eval_xent"][-1] for label, c in curves.items()}
  gain = final[_DENSE.label] - final[_SWITCH.label]
  kept = final[_DENSE.label] - final[_STUDENT]
  share = kept / gain if gain > SEED_SPREAD else None
  init_only = final[_DENSE.label] - final[_INIT_ONLY]
  n = min(20, steps)
  teacher_xent, eval_commands = own_batches_xent(*runs[_SWITCH.label][:2], steps, n)
  figures = {"final_eval_xent": final, "teacher_gain": gain, "student_gain": kept,
             "share_of_teacher_gain_kept": share, "init_only_gain": init_only,
             "share_kept_by_init_alone": init_only / gain if gain > SEED_SPREAD else None,
             # The teacher on its own last n training batches and on the n after them.
             "teacher_xent_own_last_batches": teacher_xent["last"],
             "teacher_xent_next_batches": teacher_xent["next"], "own_batches_n": n}
  report = _write_staged(name, claim, seed=seed, steps=steps, scale=scale, quick=quick,
                commands=commands + eval_commands, figures=figures, curves=curves, out=out,
                title=claim.title + (f": student keeps {share:.0%} of the teacher's gain"
                                     if share is not None else
                                     ": the teacher's gain is within the seed spread"))
  lines = ["| model | final eval xent |", "|---|---|"]
  lines += [f"| {label} | {x:.4f} |" for label, x in final.items()]
  lines += ["", f"- teacher's gain over dense: {gain:+.4f} nats; student's: {kept:+.4f} nats; "
            + (f"share kept: {share:.0%}" if share is not None else
               f"share kept: undefined (the teacher's gain is not above the seed-to-seed "
               f"spread, {SEED_SPREAD})"),
            f"- without the teacher's probabilities (alpha 0): {init_only:+.4f} nats",
            f"- the teacher on its last {n} training batches: {teacher_xent['last']:.4f}; on "
            f"the {n} after them (the student's first): {teacher_xent['next']:.4f}"]
  log("\n".join(lines))
  return report


UPCYCLING = Claim(
    "Sparse upcycling vs continuing the dense model vs an MoE from scratch",
    "Sparse Upcycling (Komatsuzaki et al. 2022), Fig. 2 / 3: for the same extra training, a "
    "dense checkpoint upcycled to an MoE beats both the dense model trained on and an MoE "
    "trained from scratch", (_DENSE, _SWITCH))
_DENSE_ON = "dense T5, trained on"
_SCRATCH_ON = "Switch from scratch"
_UPCYCLED = "Switch upcycled from the dense checkpoint"
# Upcycling without the dense run's optimizer state, and its control: the dense model trained on
# from its checkpoint's params and step with a fresh Adafactor state (mode 'params').
_UPCYCLED_FRESH = "Switch upcycled, fresh optimizer state"
_DENSE_FRESH = "dense T5, trained on with a fresh optimizer state"


def upcycling_commands(seed: int, steps: int, scale: str, quick: bool, runs_dir: str
                       ) -> dict[str, tuple[list[str], str, int]]:
  """label -> (command, MODEL_DIR, final step). Stage 1: the dense and Switch runs of `steps`
  (sample_efficiency's). Stage 2, `steps` more each: both continued from their checkpoints
  (gin/runs/continue_pretrain.gin: state, step and data position restored, so each curve is the
  run trained for 2x steps), and the dense checkpoint upcycled (gin/runs/sparse_upcycle.gin:
  experts copied from the dense MLP, fresh routers, the dense run's optimizer state,
  learning-rate schedule and data stream continued from its last step). Then the same
  upcycling with a fresh optimizer state, and its control: the dense model trained on from its
  params and step alone, with a fresh optimizer state."""
  claim = UPCYCLING
  stage1 = _baseline_runs(claim, seed, steps, scale, quick, runs_dir)
  runs = {}
  for (label, variant), on in zip(((_DENSE_ON, _DENSE), (_SCRATCH_ON, _SWITCH)),
                                  (_DENSE.label, _SWITCH.label)):
    source = os.path.join(stage1[on][1], f"checkpoint_{steps}")
    cmd = _stage_command(claim, variant, "continue_pretrain.gin", seed, steps, scale, quick,
                         f"TRAIN_STEPS={2 * steps}", f"INITIAL_CHECKPOINT_PATH='{source}'")
    runs[on] = stage1[on]
    runs[label] = (with_model_dir(cmd, _run_dir(runs_dir, cmd)), _run_dir(runs_dir, cmd),
                   2 * steps)
  source = os.path.join(stage1[_DENSE.label][1], f"checkpoint_{steps}")
  for label, mode in ((_UPCYCLED, "upcycle"), (_UPCYCLED_FRESH, "upcycle_params")):
    cmd = _stage_command(claim, _SWITCH, "sparse_upcycle.gin", seed, steps, scale, quick,
                         f"INITIAL_CHECKPOINT_PATH='{source}'",
                         f"LEARNING_RATE_START_STEP={steps}", f"INITIAL_CHECKPOINT_MODE='{mode}'")
    upcycled_dir = os.path.join(runs_dir, "upcycled_" + os.path.basename(_run_dir(runs_dir, cmd)))
    runs[label] = (with_model_dir(cmd, upcycled_dir), upcycled_dir, steps)
  cmd = _stage_command(claim, _DENSE, "continue_pretrain.gin", seed, steps, scale, quick,
                       f"TRAIN_STEPS={2 * steps}", f"INITIAL_CHECKPOINT_PATH='{source}'",
                       "trainer.train.initial_checkpoint_mode='params'")
  runs[_DENSE_FRESH] = (with_model_dir(cmd, _run_dir(runs_dir, cmd)), _run_dir(runs_dir, cmd),
                        2 * steps)
  return runs


def reproduce_upcycling(*, seed: int = 0, steps: int | None = None, scale: str = "tiny",
                        quick: bool = False, runs_dir: str, out: str,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or reuses) the runs of upcycling_commands; writes <out>/upcycling.json and .png.
  Curves are on the total step count (the upcycled run's steps shifted by the dense run's).
  Figures: final eval cross-entropy after 2x steps; the upcycled model against the MoE from
  scratch after the same `steps` of MoE training; the step where the scratch MoE catches up."""
  steps = steps or (60 if quick else UPCYCLING.steps)
  curves, commands = _train_stages(
      "upcycling", upcycling_commands(seed, steps, scale, quick, runs_dir))
  for label in (_UPCYCLED, _UPCYCLED_FRESH):
    curves[label]["eval_steps"] = [steps + s for s in curves[label]["eval_steps"]]
  # Each continued curve is its stage-1 curve followed by the continuation.
  for label, on in ((_DENSE_ON, _DENSE.label), (_SCRATCH_ON, _SWITCH.label)):
    first = curves.pop(on)
    curves[label] = {"eval_steps": first["eval_steps"] + curves[label]["eval_steps"],
                     "eval_xent": first["eval_xent"] + curves[label]["eval_xent"],
                     "train_seconds": [first["train_seconds"], curves[label]["train_seconds"]]}
  curves = {label: curves[label]
            for label in (_DENSE_ON, _SCRATCH_ON, _UPCYCLED, _UPCYCLED_FRESH, _DENSE_FRESH)}
  final = {label: c["eval_xent"][-1] for label, c in curves.items()}
  scratch = curves[_SCRATCH_ON]
  scratch_at_steps = scratch["eval_xent"][scratch["eval_steps"].index(steps)]
  figures = {
      "final_eval_xent": final,
      "upcycled_gain_over_dense": final[_DENSE_ON] - final[_UPCYCLED],
      "upcycled_gain_over_scratch": final[_SCRATCH_ON] - final[_UPCYCLED],
      # What a fresh optimizer state alone costs, upcycled and dense (params and step kept).
      "fresh_optimizer_cost_upcycled": final[_UPCYCLED_FRESH] - final[_UPCYCLED],
      "fresh_optimizer_cost_dense": final[_DENSE_FRESH] - final[_DENSE_ON],
      "scratch_eval_xent_after_same_moe_steps": scratch_at_steps,
      "scratch_steps_to_reach_upcycled": steps_to_reach(
          scratch["eval_steps"], scratch["eval_xent"], final[_UPCYCLED])}
  report = _write_staged("upcycling", UPCYCLING, seed=seed, steps=steps, scale=scale, quick=quick,
                commands=commands, figures=figures, curves=curves, out=out,
                title="Sparse upcycling (dotted line: the dense checkpoint upcycled)", vline=steps)
  reach = figures["scratch_steps_to_reach_upcycled"]
  lines = [f"| model | eval xent at step {2 * steps} |", "|---|---|"]
  lines += [f"| {label} | {x:.4f} |" for label, x in final.items()]
  lines += ["", f"- upcycled vs dense trained on: {figures['upcycled_gain_over_dense']:+.4f} "
            f"nats; vs Switch from scratch: {figures['upcycled_gain_over_scratch']:+.4f}",
            f"- after the same {steps} MoE steps: upcycled {final[_UPCYCLED]:.4f}, scratch "
            f"{scratch_at_steps:.4f}; the scratch MoE reaches the upcycled loss "
            + (f"at step {reach:.0f}" if reach is not None else f"not within {2 * steps} steps"),
            f"- a fresh optimizer state costs the upcycled model "
            f"{figures['fresh_optimizer_cost_upcycled']:+.4f} nats, the dense model trained on "
            f"{figures['fresh_optimizer_cost_dense']:+.4f}"]
  log("\n".join(lines))
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0])
  parser.add_argument("claim", nargs="?", help="one of --list")
  parser.add_argument("--list", action="store_true", help="list the claims")
  parser.add_argument("--seeds", type=int, nargs="+")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--scale", choices=SCALES, default="tiny",
                      help="model size: gin/models/<stem>_<scale>.gin")
  parser.add_argument("--quick", action="store_true", help="smoke-sized runs (not results)")
  parser.add_argument("--runs_dir", default=os.path.join(_ROOT, "runs", "reproduce"))
  parser.add_argument("--out", default=os.path.join(_ROOT, "docs", "results"))
  args = parser.parse_args(argv)
  if args.list or not args.claim:
    for name, claim in CLAIMS.items():
      print(f"{name:25s} {claim.title} ({len(claim.variants)} variants x "
            f"{len(claim.seeds)} seed(s), {claim.steps} steps on {claim.task})")
    for name, claim in (("distillation", DISTILLATION), ("distillation_span", DISTILLATION_SPAN)):
      print(f"{name:25s} {claim.title} (dense, Switch teacher, student; seed 0, "
            f"{claim.steps} steps on {claim.task})")
    print(f"{'upcycling':25s} {UPCYCLING.title} (dense and Switch, each trained on, and the "
          f"upcycled dense; seed 0, 2x{UPCYCLING.steps} steps on {UPCYCLING.task})")
    return 0
  if args.claim == "upcycling":
    reproduce_upcycling(seed=(args.seeds or [0])[0], steps=args.steps, scale=args.scale,
                        quick=args.quick, runs_dir=args.runs_dir, out=args.out)
    return 0
  if args.claim in ("distillation", "distillation_span"):
    reproduce_distillation(args.claim, seed=(args.seeds or [0])[0], steps=args.steps,
                           scale=args.scale, quick=args.quick, runs_dir=args.runs_dir,
                           out=args.out)
    return 0
  if args.claim not in CLAIMS:
    parser.error(f"claim: unknown {args.claim!r}; one of {', '.join(CLAIMS)}")
  reproduce(args.claim, seeds=args.seeds, steps=args.steps, scale=args.scale, quick=args.quick,
            runs_dir=args.runs_dir, out=args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
