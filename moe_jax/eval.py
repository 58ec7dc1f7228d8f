"""Evaluate a checkpoint, t5x style: loss and accuracy per task of a mixture.

  python -m moe_jax.eval \\
    --gin_file=gin/models/switch_tiny.gin --gin_file=gin/runs/eval.gin \\
    --gin.CHECKPOINT_PATH=\\"/tmp/run/checkpoint_200\\" --gin.EVAL_OUTPUT_DIR=\\"/tmp/run/eval\\"

Flags as in moe_jax.train. Writes EVAL_OUTPUT_DIR/eval_results.json, TensorBoard scalars in
EVAL_OUTPUT_DIR and prints the results.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import gin
import jax
from etils import epath

from moe_jax import evaluation
from moe_jax import metrics_writer
from moe_jax import partitioning
from moe_jax import restore
from moe_jax import train
from moe_jax import validation
from moe_jax.checkpoints import orbax_utils


@gin.configurable
def evaluate(*, model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
             mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             batch_size: int = gin.REQUIRED, output_dir: str | None = None,
             split: str = "validation", eval_steps: int | None = None, pack: bool = True,
             train_batches_from: int | None = None, seed: int = 0,
             partitioner: partitioning.Partitioner | None = None) -> dict[str, Any]:
  """Restores the params at checkpoint_path and evaluates every task of the mixture.

  checkpoint_path: a checkpoint_<step> directory or a model dir (latest step) [CHECKPOINT_PATH].
  output_dir: where eval_results.json and TensorBoard logs go (default: <model dir>/eval)
    [EVAL_OUTPUT_DIR]. eval_steps: batches per task (None: the whole split, one process only).
  train_batches_from: k evaluates on the training stream of the run with seed `seed` from its
    batch k instead of `split` (one task): e.g. a checkpoint of step s on the batches it
    trained on last (k = s - eval_steps) against the ones after (k = s) [TRAIN_BATCHES_FROM,
    RANDOM_SEED].
  Returns {'step': s, '<task>/loss': ..., '<task>/accuracy': ..., '<task>/num_tokens': ...}.
  """
  validation.integer("EVAL_STEPS", eval_steps, minimum=1,
                     allow_none=jax.process_count() == 1 and train_batches_from is None)
  validation.integer("TRAIN_BATCHES_FROM", train_batches_from, minimum=0, allow_none=True)
  if train_batches_from is not None:
    split = "train"
  trainer, params, model_dir, step = restore.restore_for_inference(
      model, partitioner, task_feature_lengths, batch_size, pack, checkpoint_path,
      mixture_or_task_name, split)
  tasks = evaluation.task_names(mixture_or_task_name)
  if train_batches_from is not None and len(tasks) > 1:
    raise validation.SettingError("TRAIN_BATCHES_FROM", f"reads one task's training stream; "
                                  f"{mixture_or_task_name} is a mixture of {len(tasks)} tasks")
  batches = {task: evaluation.eval_batches(
      task, task_feature_lengths=task_feature_lengths, batch_size=batch_size, split=split,
      eval_steps=eval_steps, pack=pack, seed=seed, train_stream_from=train_batches_from)
      for task in tasks}
  results = evaluation.evaluate_tasks(trainer, params, batches)
  stream = {} if train_batches_from is None else dict(train_batches_from=train_batches_from,
                                                      seed=seed)
  output_dir = orbax_utils.absolute(output_dir or os.path.join(model_dir, "eval"))
  if jax.process_index() == 0:
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    logger = metrics_writer.MetricsLogger(output_dir, None)
    logger.write(step, results)
    logger.close()
    (epath.Path(output_dir) / "eval_results.json").write_text(json.dumps(
        dict(step=step, checkpoint=checkpoint_path, split=split, **stream, **results),
        indent=1))
  return dict(step=step, output_dir=output_dir, **results)


def main(argv: Sequence[str] | None = None) -> None:
  results = train.run(evaluate, argv, "moe_jax.eval")
  if jax.process_index() == 0:
    print(f"Evaluated step {results['step']}:")
    for key, value in results.items():
      if "/" in key and not key.endswith("num_tokens"):
        print(f"  {key}: {value:.4f}")
    print(f"Results: {os.path.join(results['output_dir'], 'eval_results.json')}", flush=True)


if __name__ == "__main__":
  # Run the importable module, not this __main__ copy, so gin's bindings (made against
  # moe_jax.eval.evaluate) apply.
  from moe_jax import eval as _eval  # pylint: disable=redefined-builtin
  _eval.main()
