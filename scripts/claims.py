"""A paper claim's training runs (scripts/reproduce.py): what a claim is made of, each run's
`python -m moe_jax.train` command and MODEL_DIR, training it unless finished, and its metrics
read back as the figures' input.

A run's MODEL_DIR is named by its model gin and a hash of its command, so claims that share a run
(e.g. the Switch baseline) train it once, and a finished run (its metrics reach the last step) is
not trained again.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run had the machine to itself when the 1-minute load average at its start was below this:
# only such runs' seconds are compared (reproduce.time_to_reach).
ALONE_LOAD = 0.5

# CPU-length runs: the T5 schedule with 1k warmup steps (lr 0.032, then 1/sqrt(step)) instead
# of 10k (a constant 0.01 for the whole run), which learns faster at this length.
COMMON_BINDINGS = ("WARMUP_STEPS=1000",)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model set-up of a claim: a label, a model gin stem (`switch` -> gin/models/switch_<scale>
  .gin) and gin bindings (NAME=VALUE), plus bindings that only apply at one scale."""
  label: str
  stem: str
  bindings: tuple[str, ...] = ()
  scale_bindings: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
  """A run of `variant` with gin/runs/<gin>, from an earlier run of the claim's (`source`, its
  label) checkpoint, with `bindings` after all others: str.format templates of {steps} (the first
  stage's run length), {end} (this run's last step) and {source} (the source's MODEL_DIR). A
  claim's plain Variant is the Stage of its label with no source: pretrain.gin, from scratch."""
  label: str
  variant: Variant
  gin: str = "pretrain.gin"
  source: str | None = None
  bindings: tuple[str, ...] = ()
  end: int = 1  # its last step in first-stage run lengths: 2 trains `steps` more on the source
  prefix: str = ""  # of its MODEL_DIR's name
  # Its eval curve on the claim's step axis: 'own'; 'shifted' (its step count restarts: counted
  # on from the first stage's last step); 'joined' (the source's curve, then its own: the
  # source's curve leaves the report).
  curve: str = "own"

  def __post_init__(self):
    if self.curve not in ("own", "shifted", "joined") or (self.curve != "own" and not self.source):
      raise ValueError(f"Stage {self.label!r}: curve {self.curve!r} is not 'own', or 'shifted' "
                       "or 'joined' with a source")


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper claim: its runs, the task, the run length, what to compare (`analysis`: a key of
  reproduce.ANALYSES). Each Variant trains from scratch once per seed; a claim with Stages is
  staged: one seed, its runs in the order given (a source before its stages), each run's eval
  curve reported."""
  title: str
  paper: str
  variants: tuple[Variant | Stage, ...]
  task: str = "multidomain_prefix_lm"
  steps: int = 1500
  seeds: tuple[int, ...] = (0,)
  bindings: tuple[str, ...] = ("TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",)
  analysis: str = "curves"
  # A gin/runs file after the run gin that registers and names the claim's data (e.g.
  # manpages.gin): MIXTURE_OR_TASK_NAME is then its, not bound to `task`.
  data_gin: str | None = None
  listing: str = ""  # what `reproduce.py --list` says of a staged claim's runs

  @property
  def staged(self) -> bool:
    return any(isinstance(v, Stage) for v in self.variants)


@dataclasses.dataclass(frozen=True)
class Planned:
  """One run as it will be trained: its stage, seed, command (with its MODEL_DIR) and last
  step."""
  stage: Stage
  seed: int
  cmd: list[str]
  model_dir: str
  end: int

  @property
  def label(self) -> str:
    return self.stage.label


@dataclasses.dataclass
class Trained:
  """A claim's finished runs, the input of its figures."""
  steps: int  # the first stage's run length
  planned: list[Planned]
  # label -> one run_summary per seed; in a staged claim, label -> its eval_curve.
  runs: dict[str, Any]
  commands: list[str]  # as typed; a figure that runs an evaluation adds its own
  claim: Claim | None = None

  def run(self, label: str) -> Planned:
    return next(p for p in self.planned if p.label == label)


# ---- commands ----------------------------------------------------------------------------


def train_command(claim: Claim, variant: Variant, seed: int, steps: int, scale: str,
                  quick: bool, run_gin: str = "pretrain.gin", extra: Sequence[str] = ()
                  ) -> list[str]:
  """The `python -m moe_jax.train` command of one run (--quick: tiny models, small batches);
  `extra` bindings last, so they win."""
  scale = "tiny" if quick else scale
  bindings = [*COMMON_BINDINGS, f"TRAIN_STEPS={steps}", f"RANDOM_SEED={seed}",
              *(() if claim.data_gin else (f"MIXTURE_OR_TASK_NAME='{claim.task}'",)),
              f"EVAL_PERIOD={max(steps // 10, 1)}", "EVAL_STEPS=20",
              f"CHECKPOINT_PERIOD={steps}", "KEEP_CHECKPOINTS=1",
              f"STATS_PERIOD={max(steps // 100, 1)}"]
  bindings += [*claim.bindings, *variant.bindings, *dict(variant.scale_bindings).get(scale, ())]
  if quick:  # last but for `extra`: gin takes the last binding of a name
    bindings += ["BATCH_SIZE=16", "EVAL_STEPS=4",
                 "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
  data_gin = (f"--gin_file=gin/runs/{claim.data_gin}",) if claim.data_gin else ()
  return [sys.executable, "-m", "moe_jax.train",
          f"--gin_file=gin/models/{variant.stem}_{scale}.gin", f"--gin_file=gin/runs/{run_gin}",
          *data_gin, *[f"--gin.{b}" for b in [*bindings, *extra]]]


def _run_dir(runs_dir: str, cmd: Sequence[str], prefix: str = "") -> str:
  """A run's MODEL_DIR: <prefix><model gin>_<hash of the command>."""
  gin_file = next(a for a in cmd if a.startswith("--gin_file=gin/models/"))
  stem = os.path.basename(gin_file).removesuffix(".gin")
  key = hashlib.sha256("\0".join(a for a in cmd[1:] if "MODEL_DIR" not in a).encode())
  return os.path.join(runs_dir, f"{prefix}{stem}_{key.hexdigest()[:10]}")


def plan(claim: Claim, seeds: Sequence[int], steps: int, scale: str, quick: bool,
         runs_dir: str) -> list[Planned]:
  """Every run of the claim in training order: each of its variants with each seed in turn."""
  planned: list[Planned] = []
  dirs: dict[tuple[str, int], str] = {}
  for run in claim.variants:
    stage = run if isinstance(run, Stage) else Stage(run.label, run)
    for seed in seeds:
      fields = {"steps": steps, "end": stage.end * steps,
                "source": stage.source and dirs[(stage.source, seed)]}
      cmd = train_command(claim, stage.variant, seed, steps, scale, quick, stage.gin,
                          [b.format(**fields) for b in stage.bindings])
      model_dir = dirs[(stage.label, seed)] = _run_dir(runs_dir, cmd, stage.prefix)
      planned.append(Planned(stage, seed, [*cmd, f"--gin.MODEL_DIR='{model_dir}'"], model_dir,
                             stage.end * steps))
  return planned


def display_command(cmd: Sequence[str]) -> str:
  """A run's command as a person would type it from the repo root: `python`, paths relative to
  the root, gin strings inside double quotes."""
  def quote(arg: str) -> str:
    arg = arg.replace(ROOT + os.sep, "")
    if not any(c in arg for c in "\"$`\\") and "'" in arg:
      return f'"{arg}"'
    return shlex.quote(arg)
  return " ".join(["python", *map(quote, cmd[1:])])


# ---- training ----------------------------------------------------------------------------


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


def wait_until_idle(poll_seconds: float = 10.0) -> float:
  """Blocks until the 1-minute load average is below ALONE_LOAD (after a run it stays high for
  a minute or two); returns that load average."""
  while (load := os.getloadavg()[0]) >= ALONE_LOAD:
    time.sleep(poll_seconds)
  return load


def run_one(cmd: Sequence[str], model_dir: str, steps: int, alone: bool = False
            ) -> float | None:
  """Trains unless finished (with `alone`, once the machine is idle: wait_until_idle); returns
  the wall seconds of the command (kept in MODEL_DIR/wall_seconds, so a later analysis still
  has them; None if unknown)."""
  seconds_file = os.path.join(model_dir, "wall_seconds")
  if not _finished(model_dir, steps):
    load = wait_until_idle() if alone else os.getloadavg()[0]
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "load_at_start"), "w") as f:
      f.write(f"{load:.3f}\n")  # 1-minute load average: was the machine idle?
    start = time.time()
    with open(os.path.join(model_dir, "started_at"), "w") as f:
      f.write(f"{start:.2f}\n")  # Unix seconds: metrics.jsonl's row times count from here
    with open(os.path.join(model_dir, "train.log"), "w") as log:
      result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
      raise SystemExit(f"reproduce.py: error: run failed ({result.returncode}); see "
                       f"{os.path.join(model_dir, 'train.log')}: {shlex.join(cmd)}")
    with open(seconds_file, "w") as f:
      f.write(f"{time.time() - start:.1f}\n")
  if not os.path.exists(seconds_file):
    return None
  with open(seconds_file) as f:
    return float(f.read())


def train(name: str, claim: Claim, planned: list[Planned], steps: int, alone: bool = False
          ) -> Trained:
  """Trains (or reuses) each planned run in order (`alone`: each once the machine is idle) and
  reads it back: run_summary per seed, or in a staged claim each run's eval_curve on the
  claim's step axis."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  runs: dict[str, Any] = {}
  commands = []
  for p in tqdm(planned, desc=name, unit="run"):
    commands.append(display_command(p.cmd))
    seconds = run_one(p.cmd, p.model_dir, p.end, alone)
    if claim.staged:
      runs[p.label] = eval_curve(p.model_dir, seconds)
    else:
      runs.setdefault(p.label, []).append(run_summary(p.model_dir, seconds))
  if claim.staged:
    runs = _on_claim_steps(planned, runs, steps)
  return Trained(steps, planned, runs, commands, claim)


def _on_claim_steps(planned: list[Planned], curves: dict[str, dict], steps: int
                    ) -> dict[str, dict]:
  """Each stage's eval curve as its Stage.curve says (the joined sources left out)."""
  out = {}
  for stage in (p.stage for p in planned):
    c = curves[stage.label]
    if stage.curve == "shifted":
      c = {**c, "eval_steps": [steps + s for s in c["eval_steps"]]}
    elif stage.curve == "joined":
      first = curves[stage.source]
      c = {"eval_steps": first["eval_steps"] + c["eval_steps"],
           "eval_xent": first["eval_xent"] + c["eval_xent"],
           "train_seconds": [first["train_seconds"], c["train_seconds"]]}
    out[stage.label] = c
  joined = {p.stage.source for p in planned if p.stage.curve == "joined"}
  return {label: c for label, c in out.items() if label not in joined}


# ---- metrics -----------------------------------------------------------------------------


def _eval_keys(row: dict) -> list[str]:
  # Cross-entropy, as the papers compare: an MoE model's total loss adds its load-balance and
  # router z-losses (~0.01 here), which would bias every comparison against it.
  return [k for k in row if k.startswith("eval/") and k.endswith("/cross_ent_loss")]


def _eval_xent(row: dict) -> float:
  """An eval row's cross-entropy: its task's, or for a mixture the mean over its tasks (each
  language counts once, as mT5 and Switch report multilingual results)."""
  return float(np.mean([row[k] for k in _eval_keys(row)]))


def _number(model_dir: str, name: str) -> float | None:
  """The number run_one kept in MODEL_DIR/name (load_at_start, started_at), None if absent."""
  path = os.path.join(model_dir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return float(f.read())


def _eval_seconds(model_dir: str, evals: list[dict]) -> list[float] | None:
  """Seconds from the start of the run's command to each eval row (rows carry their Unix time
  since metrics.jsonl had one); None for a run without them or one resumed (its rows' times
  would include the pause)."""
  started = _number(model_dir, "started_at")
  if started is None or not all("time" in r for r in evals) or evals[0]["time"] < started:
    return None
  return [r["time"] - started for r in evals]


def run_summary(model_dir: str, seconds: float | None) -> dict[str, Any]:
  """Curves and end-of-run figures of one finished run."""
  train_rows, evals = read_metrics(model_dir)
  moe_keys = sorted({k.rsplit("/", 1)[0] for k in train_rows[-1] if k.startswith("moe/")})
  loads = [np.array([r[f"{k}/expert_load"] for r in train_rows]) for k in moe_keys]
  summary = {
      "eval_steps": [r["step"] for r in evals],
      "eval_loss": [_eval_xent(r) for r in evals],
      "train_steps": [r["step"] for r in train_rows],
      "train_xent": [r["cross_ent_loss"] for r in train_rows],
      "final_eval_loss": _eval_xent(evals[-1]),
      "tokens_per_second": float(np.median([r["tokens_per_second"] for r in train_rows
                                            if "tokens_per_second" in r])),
      "train_seconds": seconds,
      "load_at_start": _number(model_dir, "load_at_start"),
      "eval_seconds": _eval_seconds(model_dir, evals),
  }
  keys = _eval_keys(evals[-1])
  if len(keys) > 1:  # a mixture: each task's curve and eval tokens
    name = lambda k: k.split("/")[1]
    summary["eval_tasks"] = {name(k): [r[k] for r in evals] for k in keys}
    summary["eval_task_tokens"] = {
        name(k): evals[-1][k.replace("/cross_ent_loss", "/num_tokens")] for k in keys}
  if moe_keys:
    drops = [np.mean([r[f"{k}/fraction_dropped"] for k in moe_keys]) for r in train_rows]
    # Coefficient of variation of the expert load, mean over MoE layers, per stats period.
    cv = np.mean([load.std(-1) / load.mean(-1) for load in loads], axis=0)
    summary.update(fraction_dropped=[float(d) for d in drops], load_cv=cv.tolist(),
                   final_fraction_dropped=float(np.mean(drops[-10:])),
                   router_confidence=float(np.mean(
                       [train_rows[-1][f"{k}/router_confidence"] for k in moe_keys])))
  return summary


def eval_curve(model_dir: str, seconds: float | None) -> dict[str, Any]:
  """Eval cross-entropy curve (the aux and z-losses left out: the models' quality alone) and
  the run's wall seconds."""
  _, evals = read_metrics(model_dir)
  return {"eval_steps": [r["step"] for r in evals], "eval_xent": [_eval_xent(r) for r in evals],
          "train_seconds": seconds}


# The settings of a training command that eval.gin also has (the model's data and batches).
_EVAL_SETTINGS = ("MIXTURE_OR_TASK_NAME=", "TASK_FEATURE_LENGTHS=", "BATCH_SIZE=", "RANDOM_SEED=",
                  "data.")


def _checked(cmd: Sequence[str], what: str) -> None:
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"reproduce.py: error: {what} failed ({done.returncode}): "
                     f"{shlex.join(cmd)}\n{done.stderr[-2000:]}")


def own_batches_xent(run: Planned, n: int) -> tuple[dict[str, float], list[str]]:
  """A finished run's cross-entropy on the last n batches it trained on and on the n batches
  after them (`moe_jax.eval` with TRAIN_BATCHES_FROM), and the two commands as typed.

  What a model keeps of its latest batches: a distillation student that reads the teacher's
  training stream again would end on batches whose targets the teacher still remembers.
  """
  task = next(a.split("=", 1)[1].strip("'") for a in run.cmd if a.startswith(
      "--gin.MIXTURE_OR_TASK_NAME="))
  base = [sys.executable, "-m", "moe_jax.eval",
          next(a for a in run.cmd if a.startswith("--gin_file=gin/models/")),
          "--gin_file=gin/runs/eval.gin",
          *[a for a in run.cmd if a.startswith("--gin.") and a[6:].startswith(_EVAL_SETTINGS)],
          f"--gin.CHECKPOINT_PATH='{run.model_dir}'", f"--gin.EVAL_STEPS={n}"]
  xent, commands = {}, []
  for label, start in (("last", run.end - n), ("next", run.end)):
    out_dir = os.path.join(run.model_dir, f"train_batches_from_{start}")
    eval_cmd = [*base, f"--gin.TRAIN_BATCHES_FROM={start}", f"--gin.EVAL_OUTPUT_DIR='{out_dir}'"]
    results = os.path.join(out_dir, "eval_results.json")
    if not os.path.exists(results):
      _checked(eval_cmd, "eval")
    with open(results) as f:
      xent[label] = json.load(f)[f"{task}/cross_ent_loss"]
    commands.append(display_command(eval_cmd))
  return xent, commands


def _setting(claim: Claim, name: str) -> str:
  """The last binding of a macro among the claim's bindings (as gin takes the last)."""
  return [b.split("=", 1)[1] for b in claim.bindings if b.startswith(f"{name}=")][-1]


def hf_control(t: Trained, seed: int) -> tuple[dict[str, Any], list[str]]:
  """scripts/torch_control.py on the batches of seed `seed`'s runs of claim t.claim: the export
  (the claim's task, lengths, batch 32, EVAL_STEPS, data bindings), then HF's T5 and Switch at
  the sizes of t5_tiny / switch_tiny, initialised with the seed, evaluated every tenth of the run.
  Each step is skipped when its output exists. Returns torch_control's JSON (with train_tokens:
  the predicted tokens of the batches) and the commands."""
  claim = t.claim
  lengths = ast.literal_eval(_setting(claim, "TASK_FEATURE_LENGTHS"))
  out = os.path.join(os.path.dirname(t.planned[0].model_dir), f"hf_{claim.task}_seed{seed}")
  script = os.path.join(ROOT, "scripts", "torch_control.py")
  export = [sys.executable, script, "export", "--task", claim.task, "--out",
            os.path.join(out, "batches"), "--steps", str(t.steps), "--batch_size", "32",
            "--inputs_length", str(lengths["inputs"]), "--targets_length",
            str(lengths["targets"]), "--eval_steps", _setting(claim, "EVAL_STEPS"),
            "--seed", str(seed),
            *[f"--gin_binding={b}" for b in claim.bindings if b.startswith("data.")]]
  train_hf = [sys.executable, script, "train", "--data", os.path.join(out, "batches"), "--out",
              os.path.join(out, "hf.json"), "--models", "t5_tiny,switch_tiny", "--seeds",
              str(seed), "--eval_period", str(max(t.steps // 10, 1)),
              "--threads", "1"]  # one core, as a run beside another on a 2-core machine
  if not os.path.exists(os.path.join(out, "batches", "meta.json")):
    _checked(export, "the export of the batches")
  if not os.path.exists(os.path.join(out, "hf.json")):
    _checked(train_hf, "HF training")
  with open(os.path.join(out, "hf.json")) as f:
    result = json.load(f)
  weights = np.load(os.path.join(out, "batches", "train", "decoder_loss_weights.npy"))
  result["train_tokens"] = float(weights.sum())  # the predicted tokens of its training batches
  return result, [display_command(export), display_command(train_hf)]
