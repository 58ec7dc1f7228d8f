"""Decode a task's examples with a checkpoint and write text predictions, t5x style.

  python -m moe_jax.infer \\
    --gin_file=gin/models/switch_tiny.gin --gin_file=gin/runs/infer.gin \\
    --gin.CHECKPOINT_PATH=\\"/tmp/run/checkpoint_200\\" --gin.INFER_OUTPUT_DIR=\\"/tmp/run/infer\\"

Flags as in moe_jax.train. Writes one JSON line per example to
INFER_OUTPUT_DIR/<task>-<split>-<step>.jsonl: {"inputs", "prediction", "targets"} as text (the
task's vocabulary) plus "prediction_ids". Greedy decoding by default; `infer.decode_method`
= 'sample' or 'beam' (with temperature, top_k, beam_size, alpha).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import gin
import jax
from etils import epath
import numpy as np

from moe_jax import evaluation
from moe_jax import models
from moe_jax import partitioning
from moe_jax import restore
from moe_jax import run_config
from moe_jax import train
from moe_jax import validation
from moe_jax.checkpoints import orbax_utils


def ids_to_text(ids: Sequence[int], vocabulary: Any) -> str:
  """Token ids up to the first EOS, padding dropped -> text."""
  ids = [int(i) for i in ids]
  if models.EOS_ID in ids:
    ids = ids[:ids.index(models.EOS_ID)]
  return vocabulary.decode([i for i in ids if i > 0])


@gin.configurable
def infer(*, model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, output_dir: str | None = None,
          split: str = "validation", max_batches: int | None = None,
          decode_method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
          beam_size: int = 4, alpha: float = 0.6, max_decode_length: int | None = None,
          seed: int = 0, partitioner: partitioning.Partitioner | None = None) -> str:
  """Restores params, decodes up to max_batches batches of `split`; returns the output file.

  checkpoint_path [CHECKPOINT_PATH]: a checkpoint_<step> directory or a model dir.
  output_dir [INFER_OUTPUT_DIR]: default <model dir>/infer. Examples are not packed; the last
  partial batch of the split is dropped (as in training). max_decode_length defaults to
  TASK_FEATURE_LENGTHS['targets']. partitioner: default all devices on 'data'.
  """
  partitioner = partitioner or partitioning.Partitioner()
  validation.choice("DECODE_METHOD", decode_method, ("greedy", "sample", "beam"))
  validation.number("TEMPERATURE", temperature, minimum=0.0)
  validation.integer("infer.top_k", top_k, minimum=0)
  validation.integer("BEAM_SIZE", beam_size, minimum=1)
  validation.number("infer.alpha", alpha, minimum=0.0)
  validation.integer("infer.max_decode_length", max_decode_length, minimum=1, allow_none=True)
  validation.integer("MAX_BATCHES", max_batches, minimum=1,
                     allow_none=jax.process_count() == 1)
  trainer, params, model_dir, step = restore.restore_for_inference(
      model, partitioner, task_feature_lengths, batch_size, False, checkpoint_path,
      mixture_or_task_name, split)
  run_config.data_module()  # registers the tasks
  import seqio  # after data_module: TensorFlow starts only now
  vocabulary = seqio.get_mixture_or_task(mixture_or_task_name).output_features[
      "targets"].vocabulary
  batches = evaluation.eval_batches(
      mixture_or_task_name, task_feature_lengths=task_feature_lengths, batch_size=batch_size,
      split=split, eval_steps=max_batches, pack=False, seed=seed)
  decode_length = max_decode_length or task_feature_lengths["targets"]

  def predict(p, batch, rng):
    return model.predict_batch(p, batch, rng, decode_method=decode_method,
                               temperature=temperature, top_k=top_k, beam_size=beam_size,
                               alpha=alpha, max_decode_length=decode_length)
  predict_fn = None
  rng = jax.random.PRNGKey(seed)
  output_dir = orbax_utils.absolute(output_dir or os.path.join(model_dir, "infer"))
  path = os.path.join(output_dir, f"{mixture_or_task_name}-{split}-{step}.jsonl")
  rows = []
  for i, local in enumerate(batches):
    batch = partitioner.shard_batch(local)
    if predict_fn is None:
      predict_fn = partitioner.jit(
          predict, in_shardings=(trainer.params_shardings,
                                 trainer.batch_shardings(batch),
                                 trainer.replicated),
          out_shardings=trainer.replicated)
    predictions = np.asarray(jax.device_get(predict_fn(params, batch, jax.random.fold_in(rng, i))))
    inputs, targets = local["encoder_input_tokens"], local["decoder_target_tokens"]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      inputs, targets = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                         for x in (inputs, targets))
    for inp, pred, tgt in zip(inputs, predictions, targets):
      rows.append({"inputs": ids_to_text(inp, vocabulary),
                   "prediction": ids_to_text(pred, vocabulary),
                   "targets": ids_to_text(tgt, vocabulary),
                   "prediction_ids": [int(t) for t in pred if t > 0]})
  if jax.process_index() == 0:
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def main(argv: Sequence[str] | None = None) -> None:
  path = train.run(infer, argv, "moe_jax.infer")
  if jax.process_index() == 0:
    rows = [json.loads(line) for line in epath.Path(path).read_text().splitlines()]
    for row in rows[:3]:
      print(f"inputs:     {row['inputs'][:200]}\nprediction: {row['prediction'][:200]}\n"
            f"targets:    {row['targets'][:200]}\n")
    print(f"Wrote {len(rows)} predictions to {path}", flush=True)


if __name__ == "__main__":
  # Run the importable module, not this __main__ copy, so gin's bindings apply (see eval.py).
  from moe_jax import infer as _infer
  _infer.main()
