"""Eval of a model's params on the tasks of a mixture: token-weighted loss and accuracy per task,
for `python -m moe_jax.eval` and during training (TrainingEval, every EVAL_PERIOD steps)."""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from moe_jax import run_config
from moe_jax import trainer as trainer_lib

PyTree = Any


def task_names(mixture_or_task_name: str) -> list[str]:
  """The tasks eval reports separately: a mixture's tasks, or the task itself."""
  run_config.data_module()  # registers the tasks
  import seqio  # pylint: disable=import-outside-toplevel  (after data_module, for the same reason)
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = getattr(provider, "tasks", None)
  return [t.name for t in tasks] if tasks else [mixture_or_task_name]


def short_task_names(names: Sequence[str]) -> tuple[str, ...]:
  """The names without the '_'-separated words all of them start or end with
  (manpages_de_prefix_lm, manpages_pt_BR_prefix_lm -> de, pt_BR); unchanged if that leaves
  one empty."""
  words = [name.split("_") for name in names]
  start = len(os.path.commonprefix(words))  # lists of words: common leading words
  end = min(len(os.path.commonprefix([w[::-1] for w in words])),
            min(map(len, words)) - start)
  short = tuple("_".join(w[start:len(w) - end]) for w in words)
  return short if all(short) else tuple(names)


def eval_batches(task: str, *, task_feature_lengths: Mapping[str, int], batch_size: int,
                 split: str = "validation", eval_steps: int | None = 20, pack: bool = True,
                 seed: int = 0, num_shards: int | None = None,
                 train_stream_from: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches of one task for eval: the first eval_steps (None: one pass).

  Several processes repeat the data, so that each runs exactly eval_steps batches and none
  waits on a shard that ran out. num_shards: as in data.get_dataset (default process count).
  train_stream_from: k reads the training stream of `seed` (as `train` does) from its batch k
  instead of `split`: the batches a run trained on at steps k+1, k+2, ...
  """
  if eval_steps is None and jax.process_count() > 1:
    raise ValueError("eval_steps=None (a full pass) needs one process: shards of unequal length "
                     "would leave processes waiting on each other; set eval_steps")
  stream = train_stream_from is not None
  it = run_config.data_module().get_dataset(
      task, dict(task_feature_lengths), "train" if stream else split, batch_size,
      shuffle=stream, seed=seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=num_shards, pack=pack,
      num_epochs=1 if jax.process_count() == 1 and not stream else None)
  if stream:
    it.set_state(dict(it.get_state(), batches_consumed=train_stream_from))
  return itertools.islice(it, eval_steps)


def evaluate_tasks(trainer: trainer_lib.Trainer, params: PyTree,
                   batches: Mapping[str, Iterable[Mapping[str, np.ndarray]]]) -> dict[str, float]:
  """Token-weighted loss and accuracy of each task's batches ({task: batches}).

  Returns {'<task>/loss': ..., '<task>/cross_ent_loss': ..., '<task>/accuracy': ...,
  '<task>/num_tokens': ...}; a task without a token (an empty split) has NaN figures, not 0.
  """
  out = {}
  for task, task_batches in batches.items():
    sums = {"loss": 0.0, "cross_ent_loss": 0.0, "accuracy": 0.0}
    total = 0.0
    # Dispatch every batch, then fetch all metrics at once: no wait for the device per batch.
    on_device = [trainer.eval_step(params, trainer.partitioner.shard_batch(local))
                 for local in task_batches]
    for metrics in jax.device_get(on_device):
      weight = float(metrics["num_tokens"])
      for key in sums:
        sums[key] += weight * float(metrics[key])
      total += weight
    for key, value in sums.items():
      out[f"{task}/{key}"] = value / total if total else float("nan")
    out[f"{task}/num_tokens"] = total
  return out


class TrainingEval:
  """Eval during training: the first eval_cfg.steps batches of each task of the training
  mixture, read once and reused."""

  def __init__(self, trainer: trainer_lib.Trainer, dataset_cfg: run_config.DatasetConfig,
               eval_cfg: run_config.EvalConfig):
    self.trainer, self.period = trainer, eval_cfg.period
    self.tasks = task_names(dataset_cfg.mixture_or_task_name)
    self.batch_settings = dict(
        task_feature_lengths=dataset_cfg.task_feature_lengths, batch_size=dataset_cfg.batch_size,
        split=eval_cfg.split, eval_steps=eval_cfg.steps, pack=dataset_cfg.pack,
        seed=dataset_cfg.seed, num_shards=dataset_cfg.num_data_shards)
    self.data: dict[str, list[dict[str, np.ndarray]]] | None = None

  def __call__(self, params: PyTree) -> dict[str, float]:
    if self.data is None:
      self.data = {task: list(eval_batches(task, **self.batch_settings)) for task in self.tasks}
    return evaluate_tasks(self.trainer, params, self.data)
