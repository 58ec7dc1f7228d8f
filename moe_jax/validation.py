"""Run settings checked once, before anything is compiled.

Every check raises `SettingError('<SETTING>: <what is wrong and what is allowed>')`, named by
the gin macro of gin/runs/*.gin (or the configurable's parameter where no macro exists). The
CLIs (train.run) print it as one line `<prog>: error: <message>` and exit with status 2; the
Python API raises it. `RunError` is a run that cannot go on (divergence, a failed save, a busy
MODEL_DIR): one line and exit status 1. A setting that works but does less than it says (a
GROUP_SIZE no batch fills) is a one-line warning (absl logging).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import jax
from absl import logging


class SettingError(ValueError):
  """A bad run setting; str(e) is '<SETTING>: <problem>'."""
  exit_status = 2

  def __init__(self, setting: str, problem: str):
    super().__init__(f"{setting}: {problem}")
    self.setting = setting


class RunError(RuntimeError):
  """A run that stops for a reason the user must see in one line (exit status 1)."""
  exit_status = 1


def _shown(value: Any) -> str:
  return f"{value!r} ({type(value).__name__})"


def integer(setting: str, value: Any, *, minimum: int | None = None,
            allow_none: bool = False) -> None:
  """An int (not a bool, not a float such as 2.5), at least `minimum`."""
  if value is None and allow_none:
    return
  allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
  allowed += " or None" if allow_none else ""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise SettingError(setting, f"must be {allowed}, got {_shown(value)}")
  if minimum is not None and value < minimum:
    raise SettingError(setting, f"must be {allowed}, got {value}")


def number(setting: str, value: Any, *, positive: bool = False, minimum: float | None = None,
           allow_none: bool = False) -> None:
  """A finite real number (> 0 with positive, >= minimum)."""
  if value is None and allow_none:
    return
  allowed = "a finite number" + (" > 0" if positive else "")
  allowed += f" >= {minimum}" if minimum is not None else ""
  allowed += " or None" if allow_none else ""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise SettingError(setting, f"must be {allowed}, got {_shown(value)}")
  if (not math.isfinite(value) or (positive and value <= 0)
      or (minimum is not None and value < minimum)):
    raise SettingError(setting, f"must be {allowed}, got {value}")


def choice(setting: str, value: Any, allowed: Iterable[Any]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise SettingError(setting, f"must be one of {', '.join(map(repr, allowed))}, "
                                f"got {value!r}")


def feature_lengths(lengths: Any) -> None:
  """TASK_FEATURE_LENGTHS: {'inputs': int >= 1, 'targets': int >= 1}."""
  if not isinstance(lengths, Mapping) or not {"inputs", "targets"} <= set(lengths):
    raise SettingError("TASK_FEATURE_LENGTHS", "must be a dict with 'inputs' and 'targets' "
                                               f"lengths, got {lengths!r}")
  for key in ("inputs", "targets"):
    integer(f"TASK_FEATURE_LENGTHS['{key}']", lengths[key], minimum=1)


def batch(batch_size: Any, partitioner: Any, num_microbatches: int = 1,
          num_data_shards: int | None = None) -> None:
  """BATCH_SIZE >= 1, divisible by the mesh's batch partitions, the processes, the data
  shards and the microbatches."""
  integer("BATCH_SIZE", batch_size, minimum=1)
  integer("NUM_MICROBATCHES", num_microbatches, minimum=1)
  integer("NUM_DATA_SHARDS", num_data_shards, minimum=1, allow_none=True)
  try:
    partitioner.validate(batch_size=batch_size)
  except ValueError as e:
    raise SettingError("BATCH_SIZE", str(e)) from None
  if batch_size % num_microbatches:
    raise SettingError("NUM_MICROBATCHES", f"{num_microbatches} must divide BATCH_SIZE="
                                           f"{batch_size}")
  shards = jax.process_count() if num_data_shards is None else num_data_shards
  if shards % jax.process_count() or batch_size % shards:
    raise SettingError("NUM_DATA_SHARDS", f"{shards} must be a multiple of the "
                                          f"{jax.process_count()} processes and divide "
                                          f"BATCH_SIZE={batch_size}")


def schedule(learning_rate_fn: Any, total_steps: int) -> None:
  """The learning rate at the first and last steps: a finite number >= 0."""
  for step in sorted({0, 1, max(total_steps, 0)}):
    try:
      lr = learning_rate_fn(step)
    except Exception as e:  # noqa: BLE001  a bad base or warmup in the schedule's bindings
      raise SettingError("LEARNING_RATE", f"the schedule fails at step {step}: "
                                          f"{type(e).__name__}: {e}") from None
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) \
        or lr < 0:
      raise SettingError("LEARNING_RATE", f"the schedule gives {lr!r} at step {step}; it must "
                                          "be a finite number >= 0")


def model(model: Any, partitioner: Any) -> None:
  """T5 dimensions, and every MoE layer as the model builds it: router, capacity, groups, dispatch,
  expert count against the mesh's 'expert' axis. Builds modules only (nothing is traced)."""
  config = model.module.config
  for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
               "num_encoder_layers", "num_decoder_layers"):
    integer(name.upper() if name != "emb_dim" else "EMBED_DIM", getattr(config, name),
            minimum=1)
  number("DROPOUT_RATE", config.dropout_rate, minimum=0.0)
  if config.dropout_rate >= 1:
    raise SettingError("DROPOUT_RATE", f"must be in [0, 1), got {config.dropout_rate}")
  for stack in ("encoder", "decoder"):
    if getattr(config, f"{stack}_sparse_step") > 0:
      moe_layer(f"{stack} MoE layer", getattr(model.module, f"{stack}_moe"),
                stack == "decoder", partitioner)


def moe_layer(where: str, template: Any, causal: bool, partitioner: Any) -> None:
  """One MoE layer as the model copies it from its stack's template (models._make_mlp),
  checked attribute by attribute."""
  from moe_jax import routing  # pylint: disable=import-outside-toplevel

  if template is None:
    raise SettingError(f"{where.split()[0].upper()}_SPARSE_STEP",
                       f"> 0 needs models.Transformer.{where.split()[0]}_moe (an MoE layer)")
  try:
    layer = template.copy(causal=causal)
  except (ValueError, TypeError) as e:  # the layer's and router's own one-line checks
    raise SettingError(f"{where}", str(e).splitlines()[0]) from None
  integer("NUM_EXPERTS", layer.num_experts, minimum=1)
  try:
    partitioner.validate(num_experts=layer.num_experts, num_groups=layer.num_groups)
  except ValueError as e:
    raise SettingError("NUM_EXPERTS", str(e)) from None
  integer("GROUP_SIZE", layer.group_size, minimum=1, allow_none=layer.num_groups is not None)
  integer(f"{where}: num_groups", layer.num_groups, minimum=1, allow_none=True)
  number("TRAIN_CAPACITY_FACTOR", layer.train_capacity_factor, positive=True)
  number("EVAL_CAPACITY_FACTOR", layer.eval_capacity_factor, positive=True)
  integer("MIN_EXPERT_CAPACITY", layer.min_expert_capacity, minimum=0)
  integer(f"{where}: capacity_multiple_of", layer.capacity_multiple_of, minimum=1)
  choice(f"{where}: capacity_mode", layer.capacity_mode, routing.CAPACITY_MODES)
  number("EXPERT_DROPOUT_RATE", layer.dropout_rate, minimum=0.0)
  if layer.dropout_rate >= 1:
    raise SettingError("EXPERT_DROPOUT_RATE", f"must be in [0, 1), got {layer.dropout_rate}")
  number("ROUTER_JITTER_NOISE", layer.router.jitter_noise, minimum=0.0)
  if layer.router.jitter_noise >= 1:
    raise SettingError("ROUTER_JITTER_NOISE",
                       f"must be in [0, 1) (x · U(1-ε, 1+ε)), got {layer.router.jitter_noise}")


def group_sizes(model: Any, partitioner: Any, task_feature_lengths: Mapping[str, int],
                batch_size: int, num_microbatches: int = 1) -> None:
  """One warning line when a training batch has fewer tokens per batch partition than
  GROUP_SIZE for some MoE stack: its layers then route fewer, smaller groups than GROUP_SIZE
  says (with a smaller expert capacity). Call after `model` and `batch` passed."""
  config = model.module.config
  rows = batch_size // num_microbatches  # what one forward pass sees
  found = []
  for stack, feature in (("encoder", "inputs"), ("decoder", "targets")):
    template = getattr(model.module, f"{stack}_moe")
    if getattr(config, f"{stack}_sparse_step") <= 0 or template is None:
      continue
    layer = template.copy(causal=stack == "decoder")
    if layer.num_groups is not None or layer.group_rule == "sequence":
      continue  # GROUP_SIZE is not what groups the tokens
    length, partitions = task_feature_lengths[feature], partitioner.batch_partitions
    g, s = layer.group_shape(rows, length, partitions)
    fewest, _ = layer.copy(group_size=rows * length).group_shape(rows, length, partitions)
    if s < layer.group_size and g == fewest:
      found.append(f"{stack}: {rows} rows x {feature} {length} = {rows * length} tokens route "
                   f"as {g} group{'s' if g > 1 else ''} of {s}, not {layer.group_size} (expert "
                   f"capacity {layer.expert_capacity(s, False)})")
  if found:
    micro = f" / NUM_MICROBATCHES={num_microbatches}" if num_microbatches > 1 else ""
    logging.warning("GROUP_SIZE is more than a training batch gives each group (BATCH_SIZE=%d%s, "
                    "%d batch partitions): %s", batch_size, micro,
                    partitioner.batch_partitions, "; ".join(found))


def vocabulary(model: Any, task_vocab_size: int) -> None:
  """The model's embedding covers every id of the task's vocabulary."""
  size = model.module.config.vocab_size
  if size < task_vocab_size:
    raise SettingError("VOCAB_SIZE", f"the model's {size} ids do not cover the task "
                                     f"vocabulary's {task_vocab_size} (use VOCAB_SIZE >= "
                                     f"{task_vocab_size})")


def distillation(alpha: Any, teacher_vocab_size: int, student_vocab_size: int) -> None:
  """DISTILLATION_ALPHA in [0, 1]; the teacher checkpoint's vocabulary is the student's (the
  loss compares their token distributions id by id)."""
  number("DISTILLATION_ALPHA", alpha, minimum=0.0)
  if alpha > 1:
    raise SettingError("DISTILLATION_ALPHA", f"must be in [0, 1] (the teacher's weight in the "
                                             f"loss; Switch: 0.25), got {alpha}")
  if teacher_vocab_size != student_vocab_size:
    raise SettingError("TEACHER_CHECKPOINT", f"the teacher's vocabulary has "
                                             f"{teacher_vocab_size} ids, the student's "
                                             f"(VOCAB_SIZE) {student_vocab_size}; distillation "
                                             "needs the same vocabulary")


def checkpoint_matches(setting: str, path: str, stored: Any, expected: Any) -> None:
  """The params stored at `path` have the model's tree and shapes ({name: shape} dicts).

  Names the first difference: a missing or extra weight, or a shape (expert count, vocabulary
  size, dimensions) that differs."""
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing or extra:
    raise SettingError(setting, f"{path} does not hold this model's params: "
                                f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} "
                                f"not in the model (e.g. {extra[:2]}); is the model gin the "
                                "one it was trained with?")
  for name in sorted(expected):
    if tuple(stored[name]) != tuple(expected[name]):
      hint = _shape_hint(name, tuple(stored[name]), tuple(expected[name]))
      raise SettingError(setting, f"{path} holds {name} of shape {tuple(stored[name])}, the "
                                  f"model expects {tuple(expected[name])}{hint}")


def _shape_hint(name: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> str:
  if "embed" in name and stored[1:] == expected[1:]:
    return f" (vocabulary size {stored[0]} vs VOCAB_SIZE={expected[0]})"
  if name.split("/")[-1] in ("wi", "wo", "wi_0", "wi_1") and len(stored) == 3 \
      and stored[1:] == expected[1:]:
    return f" (expert count {stored[0]} vs NUM_EXPERTS={expected[0]})"
  if name.endswith("router/w") and stored[:-1] == expected[:-1]:
    return f" (expert count {stored[-1]} vs NUM_EXPERTS={expected[-1]})"
  return ""

