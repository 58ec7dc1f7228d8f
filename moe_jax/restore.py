"""Where a run's state comes from: the newest good checkpoint of MODEL_DIR (a restart, data
position included), else INITIAL_CHECKPOINT_PATH by its mode (run_config.RestoreCheckpointConfig),
else a fresh init; the data position of a checkpoint; params for eval and inference. Every
explicit checkpoint is checked against the model first (validation.SettingError)."""
from __future__ import annotations

from typing import Any, Mapping

from absl import logging
from etils import epath

from moe_jax import partitioning
from moe_jax import run_config
from moe_jax import trainer as trainer_lib
from moe_jax import validation
from moe_jax.checkpoints import model_description
from moe_jax.checkpoints import orbax_utils
from moe_jax.checkpoints import policy

PyTree = Any


def restore_for_inference(model: Any, partitioner: partitioning.Partitioner | None,
                          task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool,
                          checkpoint_path: str, mixture_or_task_name: str, split: str
                          ) -> tuple[trainer_lib.Trainer, PyTree, str, int]:
  """(trainer, params, model_dir, step) for eval / infer from a checkpoint_<step> directory or a
  model dir, with the params restored directly into their shardings. Validates the settings,
  the task and the checkpoint against the model first (validation.SettingError)."""
  partitioner = partitioner or partitioning.Partitioner()
  validation.feature_lengths(task_feature_lengths)
  validation.batch(batch_size, partitioner)
  validation.model(model, partitioner)
  validation.vocabulary(model, run_config.data_module().check_task(mixture_or_task_name, [split]))
  trainer = trainer_lib.Trainer(model, partitioner,
                                trainer_lib.batch_shapes(task_feature_lengths, batch_size, pack))
  model_dir, step = check_checkpoint("CHECKPOINT_PATH", checkpoint_path, trainer)
  params, _ = orbax_utils.restore_params_from_path(checkpoint_path, trainer.abstract_params)
  return trainer, params, model_dir, step


def check_checkpoint(setting: str, path: str, trainer: trainer_lib.Trainer) -> tuple[str, int]:
  """(model dir, step) of an explicit checkpoint that belongs to the trainer's model."""
  try:
    model_dir, step = orbax_utils.resolve_path(path)
    model_description.check(setting, orbax_utils.step_dir(model_dir, step), trainer.model,
                            trainer.abstract_params)
  except validation.SettingError:
    raise
  except (FileNotFoundError, ValueError, OSError) as e:
    raise validation.SettingError(setting, f"no readable checkpoint at {path} "
                                           f"({str(e).splitlines()[0][:200]})") from None
  return model_dir, step


def restore_or_init(trainer: trainer_lib.Trainer, it, *, model_dir: str, seed: int,
                    restore_cfg: run_config.RestoreCheckpointConfig
                    ) -> tuple[trainer_lib.TrainState, str | None, bool]:
  """(state, where from, resumed): the newest good checkpoint in MODEL_DIR (resumed), else
  INITIAL_CHECKPOINT_PATH (by mode; its data position too if restore_dataset), else a fresh
  state (seed: its params' initialization). `it`: the training data iterator, moved to the
  restored position."""
  def restore(reader, step):  # a checkpoint of another model stops the run (SettingError)
    model_description.check("MODEL_DIR", orbax_utils.step_dir(model_dir, step), trainer.model,
                            trainer.abstract_params)
    return orbax_utils.restore(reader, step, abstract_params=trainer.abstract_params,
                               abstract_train_state=trainer.abstract_train_state(),
                               with_data=True)
  found = policy.restore_newest(model_dir, restore)
  if found is not None:  # a restart: everything, data position included
    (params, train_state, data_state), step = found
    _set_data_state(it, data_state, "MODEL_DIR")
    return (trainer.state_from_items(params, train_state), orbax_utils.step_dir(model_dir, step),
            True)
  if not restore_cfg.path:
    return trainer.init_state(seed), None, False

  ckpt_dir, ckpt_step = orbax_utils.resolve_path(restore_cfg.path)
  source = orbax_utils.step_dir(ckpt_dir, ckpt_step)
  if restore_cfg.restore_dataset:  # before the state: a position that does not fit stops sooner
    set_data_state_from(it, source, "INITIAL_CHECKPOINT_PATH", "RESTORE_DATASET")
  if restore_cfg.mode in ("upcycle", "upcycle_params"):
    dense, sources = orbax_utils.restore_for_upcycle(source, trainer.abstract_params)
    report = orbax_utils.upcycle_report(sources, trainer.abstract_params)
    dense_opt = None
    if restore_cfg.mode == "upcycle":  # into the shardings the dense params came in
      dense_opt = orbax_utils.restore_opt_state_for_upcycle(source, dense)
    logging.info("sparse upcycling from %s: %d copied, %d expert weights tiled, fresh: %s; "
                 "optimizer state %s", source, len(report["copied"]), len(report["tiled"]),
                 report["fresh"], "fresh" if dense_opt is None else "carried over")
    try:
      return trainer.upcycle_state(dense, seed, dense_opt), source, False
    except ValueError as e:  # upcycle_opt_state's, raised while tracing: nothing compiled yet
      if dense_opt is None:
        raise
      raise validation.SettingError(
          "OPTIMIZER", f"{e}; upcycle with the dense run's optimizer, or with "
          "INITIAL_CHECKPOINT_MODE='upcycle_params' (a fresh optimizer state)") from None

  reader = orbax_utils.read_only_manager(ckpt_dir)
  has_train_state = (epath.Path(source) / "train_state").is_dir()
  if restore_cfg.mode == "full" and has_train_state:
    params, train_state, _ = orbax_utils.restore(
        reader, ckpt_step, abstract_params=trainer.abstract_params,
        abstract_train_state=trainer.abstract_train_state())
    state = trainer.state_from_items(params, train_state)
  else:  # 'params', or 'full' from a checkpoint without optimizer state
    params, _, _ = orbax_utils.restore(reader, ckpt_step, abstract_params=trainer.abstract_params)
    state = trainer.state_from_params(params, ckpt_step, seed)
  reader.close()
  return state, source, False


def _set_data_state(it, data_state: Mapping[str, Any] | None, setting: str,
                    switch: str | None = None) -> None:
  """Continues `it` from a checkpoint's data position (none saved: from the start). switch:
  the setting that turns this off, named in the error."""
  if data_state:
    try:
      it.set_state(data_state)
    except ValueError as e:
      off = f"; {switch}=False reads the stream from its start" if switch else ""
      raise validation.SettingError(setting, f"its checkpoint's data position does not fit "
                                             f"this run: {e}{off}") from None


def set_data_state_from(it, path: str, setting: str, switch: str) -> None:
  """Continues `it` where the run of the checkpoint at `path` stopped reading (the batches after
  the ones it trained on), if it saved a position."""
  _set_data_state(it, orbax_utils.data_state_from_path(path), setting, switch)
