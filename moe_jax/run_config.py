"""A training run's settings grouped as t5x's users know them: the data (DatasetConfig), saving
and restoring checkpoints (SaveCheckpointConfig, RestoreCheckpointConfig) and eval during
training (EvalConfig). gin/runs/*.gin build them from their macros and pass them to loop.train:

  loop.train.dataset_cfg = @run_config.DatasetConfig()
  run_config.DatasetConfig.batch_size = %BATCH_SIZE

Each checks its settings when built (validation.SettingError naming the gin macro, or the
binding where no macro exists), before anything is compiled; the checks that need the mesh or
the task stay in loop.train.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import gin
import jax

from moe_jax import validation

INITIAL_CHECKPOINT_MODES = ("full", "params", "upcycle", "upcycle_params")
CHECKPOINT_PARAMS_DTYPES = (None, "float32", "bfloat16", "float16")


def data_module():
  """moe_jax.data, imported on first use: it starts TensorFlow (through seqio), which takes
  seconds and prints to stderr, so command-line and gin errors are reported before that.

  Its gin configurables may then register after the config was finalized: no binding can name
  them unless a gin file imported the module (dynamic registration) while it was parsed.
  """
  with gin.unlock_config():
    from moe_jax import data  # pylint: disable=import-outside-toplevel
  return data


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The training data (gin macros of gin/runs/*.gin in brackets).

  mixture_or_task_name: the seqio task or mixture [MIXTURE_OR_TASK_NAME].
  task_feature_lengths: {'inputs': le, 'targets': ld} [TASK_FEATURE_LENGTHS].
  batch_size: global batch; each process reads batch_size / process_count rows [BATCH_SIZE].
  shuffle, pack: shuffle the training stream; pack several examples into a row (eval too).
  seed: the data stream's seed (training and eval batches) [RANDOM_SEED].
  num_data_shards: shards of the data (default: the process count); each process reads
    num_data_shards / process_count of them. Fix it to keep the same global batches, and a
    resumable data position, across runs with different numbers of processes
    [NUM_DATA_SHARDS].
  """
  mixture_or_task_name: str = gin.REQUIRED
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED
  batch_size: int = gin.REQUIRED
  shuffle: bool = True
  pack: bool = True
  seed: int = 0
  num_data_shards: int | None = None

  def __post_init__(self):
    validation.feature_lengths(self.task_feature_lengths)
    validation.integer("BATCH_SIZE", self.batch_size, minimum=1)
    validation.integer("RANDOM_SEED", self.seed, minimum=0)
    validation.integer("NUM_DATA_SHARDS", self.num_data_shards, minimum=1, allow_none=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """Checkpoints written to MODEL_DIR: every `period` steps, at the last step and on SIGTERM.

  period: steps between saves [CHECKPOINT_PERIOD].
  keep: the number of newest checkpoints kept (None: all) [KEEP_CHECKPOINTS].
  dtype: e.g. 'bfloat16' to store params smaller (restored as float32; None: as trained).
  save_timeout_s: several processes: how long each background save waits for the other
    processes' writes (after a write failed on one, the others stop after this long).
  """
  period: int = 1000
  keep: int | None = None
  dtype: str | None = None
  save_timeout_s: int = 1200

  def __post_init__(self):
    validation.integer("CHECKPOINT_PERIOD", self.period, minimum=1)
    validation.integer("KEEP_CHECKPOINTS", self.keep, minimum=1, allow_none=True)
    validation.choice("run_config.SaveCheckpointConfig.dtype", self.dtype,
                      CHECKPOINT_PARAMS_DTYPES)
    validation.integer("run_config.SaveCheckpointConfig.save_timeout_s", self.save_timeout_s,
                       minimum=1)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """Where a run without a checkpoint in MODEL_DIR starts (a restart always resumes MODEL_DIR).

  path: a checkpoint_<step> dir or a model dir (latest step); None: a fresh start
    [INITIAL_CHECKPOINT_PATH].
  mode: 'full' (params, optimizer state, step, rng; params only when the checkpoint has no
    optimizer state), 'params' (params and step, fresh optimizer), 'upcycle' (a dense
    checkpoint -> this MoE model at step 0 with the dense run's optimizer state, as the paper
    does; a fresh one when the checkpoint has none; see Trainer.upcycle_state) or
    'upcycle_params' (the same with a fresh optimizer state) [INITIAL_CHECKPOINT_MODE].
  restore_dataset: also restore the data position from `path` (any mode), so the run reads
    the batches after the ones that checkpoint was trained on [RESTORE_DATASET].
  """
  path: str | None = None
  mode: str = "full"
  restore_dataset: bool = False

  def __post_init__(self):
    validation.choice("INITIAL_CHECKPOINT_MODE", self.mode, INITIAL_CHECKPOINT_MODES)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Eval during training, on the first `steps` batches of each task of the mixture (read once,
  the same batches every time), logged to MODEL_DIR/training_eval and metrics.jsonl.

  period: steps between evals, and at the last step (0: never) [EVAL_PERIOD].
  steps: batches per task (None: one pass, one process only) [EVAL_STEPS].
  split: the tasks' split.
  """
  period: int = 0
  steps: int | None = 20
  split: str = "validation"

  def __post_init__(self):
    validation.integer("EVAL_PERIOD", self.period, minimum=0)
    validation.integer("EVAL_STEPS", self.steps, minimum=1,
                       allow_none=jax.process_count() == 1)
