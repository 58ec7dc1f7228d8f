"""MoE-to-dense distillation (Switch Transformer, Sec. 5).

A trained MoE teacher (the run's MODEL and TEACHER_CHECKPOINT) and its dense student: the same
T5 with a dense MLP of width MLP_DIM in every layer (the teacher's dense counterpart, equal
FLOPs per token). The student starts from the teacher's non-expert weights (attention, norms,
embeddings, the dense layers' MLPs); the MLPs of the layers where the teacher has experts start
fresh, as the paper's "initialise with the non-expert weights" (orbax_utils.dense_student_params).
Per target token the student minimises

  (1 - α) · xent(target token) + α · xent(teacher's token probabilities),  α = 0.25 (Switch)

(plus its output z-loss). The teacher runs deterministically (eval capacity factor, no
dropout or jitter) inside the student's jitted train step, its params an argument of the step
in the shardings the partitioner gives them (Trainer.frozen_params), without gradients.

  python -m moe_jax.train --gin_file=gin/models/switch_tiny.gin \\
    --gin_file=gin/runs/distill.gin --gin.MODEL_DIR=\\"/tmp/student\\" \\
    --gin.TEACHER_CHECKPOINT=\\"runs/switch_tiny\\"
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import gin
import jax
from absl import logging

from moe_jax import models
from moe_jax import partitioning
from moe_jax import restore
from moe_jax import trainer as trainer_lib
from moe_jax import validation
from moe_jax.checkpoints import orbax_utils

Array = jax.Array
PyTree = Any


def dense_student(teacher: models.EncoderDecoderModel) -> models.EncoderDecoderModel:
  """The teacher's dense counterpart: its T5 with no MoE layers, its output loss settings."""
  config = dataclasses.replace(teacher.module.config, encoder_sparse_step=0,
                               decoder_sparse_step=0)
  return models.EncoderDecoderModel(models.Transformer(config), z_loss=teacher.z_loss,
                                    label_smoothing=teacher.label_smoothing)


class DistillationModel:
  """What the trainer trains when distilling: the student (its params, init, eval), with a loss
  that also reads the teacher's params (the Trainer's frozen_params)."""

  def __init__(self, student: models.EncoderDecoderModel,
               teacher: models.EncoderDecoderModel, alpha: float):
    self.student, self.teacher, self.alpha = student, teacher, alpha
    self.module = student.module

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]
                            ) -> dict[str, Any]:
    return self.student.get_initial_variables(rng, input_shapes)

  def loss_fn(self, params: PyTree, batch: Mapping[str, Array], rng: Array | None,
              teacher_params: PyTree) -> tuple[Array, dict[str, Array]]:
    """The student's loss with α of its cross-entropy against the teacher's probabilities."""
    teacher_logits = jax.lax.stop_gradient(self.teacher.logits(teacher_params, batch))
    return self.student.loss_fn(params, batch, rng, teacher_logits, self.alpha)

  def eval_fn(self, params: PyTree, batch: Mapping[str, Array]
              ) -> tuple[Array, dict[str, Array]]:
    """The student alone on the targets: comparable with any dense model's eval."""
    return self.student.eval_fn(params, batch)


def _vocab_size(params: PyTree) -> int:
  """Rows of a params tree's token embedding."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return next(int(v.shape[0]) for k, v in flat.items() if k[-1] == "embedding")


@gin.configurable
@dataclasses.dataclass
class Distillation:
  """loop.train's `distillation` (gin/runs/distill.gin).

  teacher_checkpoint: a checkpoint_<step> directory or a model dir (latest step) of the MoE
    model the run's MODEL gin describes [TEACHER_CHECKPOINT].
  alpha: the teacher's weight in the loss, in [0, 1] [DISTILLATION_ALPHA].
  restore_dataset: the student reads the training stream from where the teacher's run stopped
    (its checkpoint's data position), not from the start [RESTORE_TEACHER_DATASET]. From the
    start, the student ends on the batches the teacher trained on last, whose targets the
    teacher's probabilities give away (on a CPU-scale Switch run, 0.9 nats lower loss there
    than on unseen batches): the student's train loss drops and its eval loss rises.
  """
  teacher_checkpoint: str = gin.REQUIRED
  alpha: float = 0.25
  restore_dataset: bool = True

  def setup(self, teacher: models.EncoderDecoderModel, partitioner: partitioning.Partitioner,
            input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[DistillationModel, PyTree]:
    """Validates the settings and the teacher checkpoint (validation.SettingError, before
    anything is compiled) -> (the model to train, the teacher's params in their shardings)."""
    path = self.teacher_checkpoint
    try:
      stored, _ = orbax_utils.params_metadata(path)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise validation.SettingError("TEACHER_CHECKPOINT", f"no readable checkpoint at {path} "
                                    f"({str(e).splitlines()[0][:200]})") from None
    student = dense_student(teacher)
    validation.distillation(self.alpha, _vocab_size(stored), student.module.config.vocab_size)
    teacher_trainer = trainer_lib.Trainer(teacher, partitioner, input_shapes)
    restore.check_checkpoint("TEACHER_CHECKPOINT", path, teacher_trainer)
    params, step = orbax_utils.restore_params_from_path(path, teacher_trainer.abstract_params)
    logging.info("distillation teacher: %s (step %d), alpha %.3g", path, step, self.alpha)
    return DistillationModel(student, teacher, self.alpha), params

  def continue_data(self, it: Any) -> None:
    """Moves the training data iterator `it` to the teacher's position (restore_dataset)."""
    if self.restore_dataset:
      restore.set_data_state_from(it, self.teacher_checkpoint, "TEACHER_CHECKPOINT",
                                  "RESTORE_TEACHER_DATASET")

  def init_student(self, trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
                   teacher_params: PyTree, seed: int) -> trainer_lib.TrainState:
    """A fresh student state -> the same with the teacher's non-expert weights, step 0."""
    params, report = orbax_utils.dense_student_params(teacher_params, state.params)
    logging.info("student from the teacher's non-expert weights: %d copied, fresh: %s",
                 len(report["copied"]), report["fresh"])
    params = jax.device_put(params, trainer.params_shardings)
    return trainer.state_from_params(params, 0, seed)
