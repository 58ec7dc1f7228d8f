"""The training run (t5x's train.py): `train(...)` is what gin/runs/*.gin configure and
`python -m moe_jax.train` runs:

  data.get_dataset (this process's shard) -> Partitioner.shard_batch -> Trainer.train_step (jit
  with explicit shardings) -> metrics (TensorBoard via clu, MODEL_DIR/metrics.jsonl, tqdm)
  -> orbax checkpoints every CHECKPOINT_PERIOD steps, the last step and on SIGTERM.

Its settings come grouped in run_config's dataclasses. Reliability pieces live in their own
modules: validation (every setting, before compiling), restore (the start: restart, initial
checkpoint or fresh), checkpoints/policy (restore the newest good checkpoint, confirm saves,
rotate), model_dir (the run lock, room to write), metrics_writer (TensorBoard, metrics.jsonl);
the non-finite guard runs in the train step (trainer.Trainer) and stops the run here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from moe_jax import evaluation
from moe_jax import metrics_writer
from moe_jax import model_dir as model_dir_lib
from moe_jax import optimizers
from moe_jax import partitioning
from moe_jax import restore
from moe_jax import run_config
from moe_jax import trainer as trainer_lib
from moe_jax import validation
from moe_jax.checkpoints import model_description
from moe_jax.checkpoints import orbax_utils
from moe_jax.checkpoints import policy

Array = jax.Array


@dataclasses.dataclass
class TrainSummary:
  """What `train` returns (and the CLI prints)."""
  step: int
  model_dir: str
  checkpoint: str | None          # the last checkpoint directory written or restored
  tensorboard_dir: str
  metrics_file: str | None       # MODEL_DIR/metrics.jsonl (local model dirs)
  preempted: bool
  final_metrics: dict[str, Any]   # train metrics averaged over the last stats period
  eval_metrics: dict[str, Any]    # last eval ('<task>/loss', '<task>/accuracy', ...)
  history: list[dict[str, Any]]   # one entry per stats period: {'step': s, metrics...}
  restored_from: str | None
  seconds: float


@gin.configurable
def train(*, model: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED,
          dataset_cfg: run_config.DatasetConfig = gin.REQUIRED,
          optimizer: optimizers.OptimizerFactory = optimizers.adafactor,
          learning_rate_fn: optimizers.Schedule | None = None,
          partitioner: partitioning.Partitioner | None = None,
          save_cfg: run_config.SaveCheckpointConfig | None = None,
          restore_cfg: run_config.RestoreCheckpointConfig | None = None,
          eval_cfg: run_config.EvalConfig | None = None, num_microbatches: int = 1,
          grad_clip_norm: float | None = None, random_seed: int = 0, stats_period: int = 10,
          max_nonfinite_skips: int = 0, use_tqdm: bool = True, write_jsonl: bool = True,
          distillation: Any | None = None) -> TrainSummary:
  """Trains `model` to step `total_steps`; resumes from MODEL_DIR's newest good checkpoint.

  Args (gin macros of gin/runs/*.gin in brackets):
    model: models.EncoderDecoderModel [MODEL].
    model_dir: checkpoints, TensorBoard logs (train/, training_eval/), metrics.jsonl and the
      run lock [MODEL_DIR].
    total_steps: the final global step, counting restored steps (t5x) [TRAIN_STEPS].
    dataset_cfg, save_cfg, restore_cfg, eval_cfg: see run_config (None: the defaults there:
      a checkpoint every 1000 steps, all kept; a fresh start; no eval).
    optimizer: factory of the update direction (optimizers.adafactor, adamw) [OPTIMIZER].
    learning_rate_fn: step -> learning rate (default optimizers.rsqrt_schedule()).
    partitioner: partitioning.Partitioner (default: all devices on 'data').
    num_microbatches: gradient accumulation slices per step [NUM_MICROBATCHES].
    grad_clip_norm: clip gradients to this global norm (None: off, as in T5) [GRAD_CLIP_NORM].
    random_seed: the params' initialization, dropout and routing noise [RANDOM_SEED].
    stats_period: steps per summary (TensorBoard, metrics.jsonl, progress bar) [STATS_PERIOD].
    max_nonfinite_skips: 0 stops the run at the first step with a non-finite loss or gradient
      (nothing of it is applied or saved); N > 0 skips such updates and stops after more than N
      in a row [MAX_NONFINITE_SKIPS]. The host reads each step's verdict once the next step
      is queued, so the run stops one step after the one that tripped the guard.
    distillation: a distill.Distillation (gin/runs/distill.gin): `model` is then the MoE
      teacher, and the run trains its dense student against the teacher's token probabilities,
      starting from the teacher's non-expert weights (unless MODEL_DIR or the initial
      checkpoint has a checkpoint) and, with its restore_dataset, from the teacher's data
      position (a restart resumes its own).
  Raises validation.SettingError for a bad setting (before anything is compiled) and
  validation.RunError when the run cannot go on (divergence, a failed save, a busy MODEL_DIR).
  """
  start_time, data = time.time(), dataset_cfg
  partitioner = partitioner or partitioning.Partitioner()
  learning_rate_fn = learning_rate_fn or optimizers.rsqrt_schedule()
  save_cfg = save_cfg or run_config.SaveCheckpointConfig()
  restore_cfg = restore_cfg or run_config.RestoreCheckpointConfig()
  eval_cfg = eval_cfg or run_config.EvalConfig()
  _check_settings(model, partitioner, data, eval_cfg, learning_rate_fn, total_steps=total_steps,
                  num_microbatches=num_microbatches, grad_clip_norm=grad_clip_norm,
                  random_seed=random_seed, stats_period=stats_period,
                  max_nonfinite_skips=max_nonfinite_skips)
  shapes = trainer_lib.batch_shapes(data.task_feature_lengths, data.batch_size, data.pack)
  teacher_params = None
  if distillation is not None:
    model, teacher_params = distillation.setup(model, partitioner, shapes)
  trainer = trainer_lib.Trainer(
      model, partitioner, shapes, optimizer, num_microbatches=num_microbatches,
      grad_clip_norm=grad_clip_norm, max_nonfinite_skips=max_nonfinite_skips,
      frozen_params=teacher_params)
  if restore_cfg.path and not restore_cfg.mode.startswith("upcycle"):
    restore.check_checkpoint("INITIAL_CHECKPOINT_PATH", restore_cfg.path, trainer)

  model_dir = orbax_utils.absolute(model_dir)
  local = "://" not in model_dir
  with contextlib.ExitStack() as cleanup:  # closed in reverse order: the lock last
    _lock_model_dir(model_dir, cleanup)
    preemption = _Preemption()  # before the restore, so that a SIGTERM during set-up counts
    cleanup.callback(preemption.close)
    if jax.process_index() == 0 and local:
      model_dir_lib.check_writable(model_dir, trainer.checkpoint_bytes())
    it = _train_data(data)
    if distillation is not None:  # replaced below by a restart's own position
      distillation.continue_data(it)
    state, restored_from, resumed = restore.restore_or_init(
        trainer, it, model_dir=model_dir, seed=random_seed, restore_cfg=restore_cfg)
    if distillation is not None and restored_from is None:
      state = distillation.init_student(trainer, state, teacher_params, random_seed)
    step = int(jax.device_get(state.step))
    if resumed and jax.process_index() == 0:
      print(f"Resumed from {restored_from} (step {step})", flush=True)
    jsonl = os.path.join(model_dir, "metrics.jsonl") if write_jsonl and local else None
    if jsonl and jax.process_index() == 0:
      metrics_writer.drop_rows_after(jsonl, step)
    evaluate = evaluation.TrainingEval(trainer, data, eval_cfg) if eval_cfg.period else None
    checkpoints = policy.CheckpointPolicy(
        model_dir, save_cfg.keep, jnp.dtype(save_cfg.dtype) if save_cfg.dtype else None,
        model_description.describe(model), save_cfg.save_timeout_s)
    cleanup.callback(checkpoints.close)
    summary = TrainSummary(
        step=step, model_dir=model_dir, checkpoint=restored_from if resumed else None,
        tensorboard_dir=model_dir, metrics_file=jsonl, preempted=False, final_metrics={},
        eval_metrics={}, history=[], restored_from=restored_from, seconds=0.0)
    loggers = _loggers(model_dir, jsonl, cleanup)
    _loop(trainer, state, it, summary, checkpoints, loggers, preemption, evaluate,
          total_steps=total_steps, learning_rate_fn=learning_rate_fn,
          checkpoint_period=save_cfg.period, stats_period=stats_period, use_tqdm=use_tqdm,
          resumed=resumed)
  summary.seconds = time.time() - start_time
  return summary


def _check_settings(model: Any, partitioner: partitioning.Partitioner,
                    data: run_config.DatasetConfig, eval_cfg: run_config.EvalConfig,
                    learning_rate_fn: optimizers.Schedule, *, total_steps: int,
                    num_microbatches: int, grad_clip_norm: float | None, random_seed: int,
                    stats_period: int, max_nonfinite_skips: int) -> None:
  """train's own settings, and those that need the mesh, the model or the task (the run_config
  dataclasses checked theirs when built); validation.SettingError."""
  for setting, value, minimum in (("TRAIN_STEPS", total_steps, 0),
                                  ("STATS_PERIOD", stats_period, 1),
                                  ("RANDOM_SEED", random_seed, 0),
                                  ("MAX_NONFINITE_SKIPS", max_nonfinite_skips, 0)):
    validation.integer(setting, value, minimum=minimum)
  validation.batch(data.batch_size, partitioner, num_microbatches, data.num_data_shards)
  validation.number("GRAD_CLIP_NORM", grad_clip_norm, positive=True, allow_none=True)
  validation.schedule(learning_rate_fn, total_steps)
  validation.model(model, partitioner)
  task_vocab_size = run_config.data_module().check_task(
      data.mixture_or_task_name, ["train"] + ([eval_cfg.split] if eval_cfg.period else []))
  validation.vocabulary(model, task_vocab_size)
  # Warnings last, so that a bad length is an error before any warning is printed.
  run_config.data_module().check_feature_lengths(data.mixture_or_task_name,
                                                 data.task_feature_lengths)
  validation.group_sizes(model, partitioner, data.task_feature_lengths, data.batch_size,
                         num_microbatches)


def _lock_model_dir(model_dir: str, cleanup: contextlib.ExitStack) -> None:
  """Process 0 creates MODEL_DIR and holds its run lock until `cleanup` closes."""
  if jax.process_index() != 0:
    return
  try:
    epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise validation.SettingError("MODEL_DIR", f"cannot create {model_dir}: "
                                               f"{e.strerror or e}") from None
  cleanup.callback(model_dir_lib.run_lock(model_dir).release)


def _train_data(data: run_config.DatasetConfig):
  """This process's shard of the shuffled training stream (data.get_dataset)."""
  return run_config.data_module().get_dataset(
      data.mixture_or_task_name, dict(data.task_feature_lengths), "train", data.batch_size,
      shuffle=data.shuffle, seed=data.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=data.num_data_shards, pack=data.pack)


def _loggers(model_dir: str, jsonl: str | None, cleanup: contextlib.ExitStack
             ) -> dict[str, metrics_writer.MetricsLogger]:
  """TensorBoard writers of train metrics (and metrics.jsonl) and of training eval, closed with
  `cleanup`."""
  loggers = {"train": metrics_writer.MetricsLogger(os.path.join(model_dir, "train"), jsonl),
             "eval": metrics_writer.MetricsLogger(os.path.join(model_dir, "training_eval"), None)}
  for logger in reversed(loggers.values()):  # closed in reverse: train, then eval
    cleanup.callback(logger.close)
  return loggers


class _Preemption:
  """SIGTERM -> checkpoint at the current step and a clean exit.

  One process: a Python signal handler sets a flag the loop polls. Several processes: jax's
  preemption sync manager (started by jax.distributed) catches SIGTERM and all processes agree
  on the step to stop at.
  """

  def __init__(self):
    self.flag = False
    self.previous = None
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _local_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding input + target tokens of this process's rows."""
  return int(np.count_nonzero(batch["encoder_input_tokens"])
             + np.count_nonzero(batch["decoder_target_tokens"]))


def _nonfinite_error(rows: list[Mapping[str, Any]], first_step: int, max_skips: int,
                     last_checkpoint: str | None) -> validation.RunError | None:
  """The error to stop with when a step of `rows` (host metrics of steps first_step, ...)
  exceeded the non-finite guard, else None. Names the step and its MoE layers' metrics."""
  for i, row in enumerate(rows):
    if int(row["nonfinite_streak"]) > max_skips:
      layers = {}
      for key, value in row.items():
        if key.startswith("moe/") and np.ndim(value) == 0:
          layer, name = key[len("moe/"):].rsplit("/", 1)
          layers.setdefault(layer, []).append(f"{name} {float(value):.4g}")
      moe = "; ".join(f"{layer}: {', '.join(v)}" for layer, v in sorted(layers.items()))
      return validation.RunError(
          f"non-finite loss, gradient or update at step {first_step + i} "
          f"(loss {float(row['loss']):.4g}, grad_norm {float(row['grad_norm']):.4g}; "
          f"{int(row['nonfinite_streak'])} in a row, MAX_NONFINITE_SKIPS={max_skips}); "
          f"MoE layers at that step: {moe or 'none'}; "
          f"stopped, last good checkpoint: {last_checkpoint or '(none)'}")
  return None


class _Period:
  """Device metrics of the steps since the last summary, fetched once per period, and the
  training throughput (the first step, i.e. compilation, evals and saves are not timed)."""

  def __init__(self, first_step: int):
    self.first_step = first_step  # the step before the period's first step
    self.pending: list[dict[str, Array]] = []
    self.host: list[dict[str, np.ndarray]] | None = None
    self.tokens, self.steps, self.paused = 0, 0, 0.0
    self.start: float | None = None

  def add(self, metrics: dict[str, Array], local_batch: Mapping[str, np.ndarray]) -> None:
    self.pending.append(metrics)
    metrics["nonfinite_streak"].copy_to_host_async()  # for previous_streak, a step later
    self.host = None
    if self.start is None:
      jax.block_until_ready(metrics)
      self.start = time.time()
    else:
      self.tokens += _local_tokens(local_batch) * jax.process_count()
      self.steps += 1

  def previous_streak(self) -> int:
    """The non-finite streak after the step before the newest one (0 when that step belongs to
    the previous period, which was checked as a whole). The newest step is already queued, so
    waiting for the one before never leaves the device idle."""
    return int(self.pending[-2]["nonfinite_streak"]) if len(self.pending) > 1 else 0

  def fetch(self) -> list[dict[str, np.ndarray]]:
    if self.host is None:
      self.host = jax.device_get(self.pending)  # one transfer per period (or save)
    return self.host

  def summarize(self, step: int) -> dict[str, Any]:
    """Averages of the period's steps (and throughput); starts the next period."""
    averaged = metrics_writer.average_metrics(self.fetch())
    elapsed = max(time.time() - self.start - self.paused, 1e-9)
    if self.steps:
      averaged["tokens_per_second"] = np.asarray(self.tokens / elapsed)
      averaged["steps_per_second"] = np.asarray(self.steps / elapsed)
    self.first_step, self.pending, self.host = step, [], None
    self.tokens, self.steps, self.paused, self.start = 0, 0, 0.0, time.time()
    return averaged


def _loop(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, it,
          summary: TrainSummary, checkpoints: policy.CheckpointPolicy, loggers: dict[str, Any],
          preemption: _Preemption, evaluate: evaluation.TrainingEval | None, *,
          total_steps: int, learning_rate_fn: optimizers.Schedule, checkpoint_period: int,
          stats_period: int, use_tqdm: bool, resumed: bool) -> None:
  """The training loop from summary.step to total_steps; fills in `summary`."""
  step, period = summary.step, _Period(summary.step)
  max_skips = trainer.max_nonfinite_skips

  def check_finite() -> None:  # before every summary and save: a checkpoint is always finite
    # (and a step after a step that the guard stopped on, see _Period.previous_streak)
    error = _nonfinite_error(period.fetch(), period.first_step + 1, max_skips, summary.checkpoint)
    if error:
      raise error

  def save() -> None:
    check_finite()
    summary.checkpoint = checkpoints.save(
        step, params=state.params, train_state={"step": state.step, "rng": state.rng,
                                                "opt_state": state.opt_state},
        data_state=it.get_state())

  if step >= total_steps:
    logging.warning("step %d already reaches TRAIN_STEPS=%d (TRAIN_STEPS counts restored "
                    "steps, as in t5x): nothing to train", step, total_steps)
    if not resumed:  # keep what was built, e.g. an upcycled model with TRAIN_STEPS=0
      save()
    return
  progress = _progress_bar(step, total_steps) if use_tqdm and jax.process_index() == 0 else None
  try:
    while step < total_steps:
      local = next(it)
      state, metrics = trainer.train_step(state, trainer.partitioner.shard_batch(local),
                                          learning_rate_fn(step))
      step += 1
      period.add(metrics, local)
      if period.previous_streak() > max_skips:  # the guard stopped updates a step ago
        check_finite()
      checkpoints.poll()  # a failed background save stops the run now
      if progress:
        progress.update(1)
      last = step >= total_steps
      if step % stats_period == 0 or last:
        check_finite()
        checkpoints.check()  # several processes: a failed save stops all of them here
        summary.final_metrics = averaged = period.summarize(step)
        summary.history.append(dict(step=step, **averaged))
        loggers["train"].write(step, averaged, split="train")
        if progress:
          postfix = {"loss": f"{float(averaged['loss']):.3f}"}
          if "tokens_per_second" in averaged:
            postfix["tok/s"] = f"{float(averaged['tokens_per_second']):.0f}"
          progress.set_postfix(postfix)
      pause_start = time.time()
      if evaluate and (step % evaluate.period == 0 or last):
        summary.eval_metrics = evaluate(state.params)
        loggers["eval"].write(step, summary.eval_metrics)
        loggers["train"].write(step, {f"eval/{k}": v for k, v in summary.eval_metrics.items()},
                               split="eval")
      summary.preempted = preemption.reached(step)
      if last or summary.preempted or step % checkpoint_period == 0:
        save()
      period.paused += time.time() - pause_start
      if summary.preempted:
        break
  finally:
    if progress:
      progress.close()
  summary.step = step


def _progress_bar(step: int, total_steps: int):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
              smoothing=0.1)


def format_summary(summary: TrainSummary) -> str:
  """The end-of-run report the CLI prints."""
  m = summary.final_metrics
  lines = [f"{'Preempted' if summary.preempted else 'Finished'} at step {summary.step} "
           f"in {summary.seconds:.0f}s."]
  if m:
    parts = [f"loss {float(m['loss']):.4f}"]
    for key in ("accuracy", "aux_loss", "z_loss", "router_z_loss", "target_cross_ent_loss",
                "teacher_cross_ent_loss"):
      if key in m:
        parts.append(f"{key} {float(m[key]):.4f}")
    if "tokens_per_second" in m:
      parts.append(f"{float(m['tokens_per_second']):.0f} tokens/s")
    lines.append("Final train metrics: " + ", ".join(parts))
    moe = metrics_writer.moe_summary(m)
    if "mean_fraction_dropped" in moe:
      lines.append(f"Tokens dropped (mean over MoE layers): {moe['mean_fraction_dropped']:.2%}; "
                   f"router confidence {moe.get('mean_router_confidence', float('nan')):.3f}")
    for layer, load in moe["expert_load"].items():
      lines.append(f"  expert load {layer}: " + " ".join(f"{x:.2f}" for x in load))
  for key, value in summary.eval_metrics.items():
    if not key.endswith("num_tokens"):
      lines.append(f"Eval {key}: {value:.4f}")
  lines.append(f"Checkpoint: {summary.checkpoint or '(none written)'}")
  lines.append(f"TensorBoard: tensorboard --logdir {summary.tensorboard_dir}")
  if summary.metrics_file:
    lines.append(f"Metrics (JSON lines): {summary.metrics_file}")
  return "\n".join(lines)
