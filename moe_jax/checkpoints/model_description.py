"""What model a checkpoint belongs to: a small JSON description saved with every checkpoint.

Equal parameter shapes do not mean the same model: a Switch (top-1) and a GShard (top-2)
checkpoint, or Switch and expert-choice routing, have the same tree. The trainer saves
`describe(model)` as the checkpoint's `model` item (written by orbax with the other items, so it
exists exactly when the checkpoint does), and every restore that must find the same model
(resume, INITIAL_CHECKPOINT_PATH in modes 'full' and 'params', eval, infer) calls `check`.
Sparse upcycling (dense -> MoE) changes the model on purpose and is not checked. Checkpoints
written before the description existed, or converted from HF, load with a one-line note.

The description holds structure only (what the params mean), taken from the built model object:
capacity factors, dropout, jitter and loss weights may change between pretraining, finetuning
and eval, so they are left out.
"""
from __future__ import annotations

from typing import Any

import flax
from absl import logging
from etils import epath

from moe_jax import validation
from moe_jax.checkpoints import orbax_utils
from moe_jax.validation import SettingError

FORMAT = 1
_SHOWN = 4  # differing fields named in the error line


def _moe(layer: Any) -> dict[str, Any] | None:
  """The structure of a stack's MoE layer template (None: the stack is dense)."""
  if layer is None:
    return None
  router = layer.router
  return {"num_experts": int(layer.num_experts), "expert_mlp_dim": int(layer.d_ff),
          "expert_activations": list(layer.activations), "router": type(router).__name__,
          "router_top_k": int(getattr(router, "num_selected_experts", 0)) or None}


def describe(model: Any) -> dict[str, Any]:
  """The structural config of a models.EncoderDecoderModel, as JSON-ready values.

  Stacks list each layer's feed-forward ('dense' or 'moe'); the MoE entry describes the
  stack's experts and router (type and top-k; None for expert-choice routing).
  """
  from moe_jax import models  # pylint: disable=import-outside-toplevel  (models imports flax)

  module = model.module
  c = module.config
  out = {"format": FORMAT, "model": type(model).__name__, "vocab_size": int(c.vocab_size),
         "d_model": int(c.emb_dim), "num_heads": int(c.num_heads), "head_dim": int(c.head_dim),
         "mlp_dim": int(c.mlp_dim), "activations": list(c.activations),
         "logits_via_embedding": bool(c.logits_via_embedding),
         "shared_input_embedding": bool(c.shared_input_embedding),
         "relative_attention_num_buckets": int(c.relative_attention_num_buckets)}
  for stack in ("encoder", "decoder"):
    num_layers, step = getattr(c, f"num_{stack}_layers"), getattr(c, f"{stack}_sparse_step")
    out[stack] = {"layers": ["moe" if models.is_sparse_layer(i, step) else "dense"
                             for i in range(num_layers)],
                  "moe": _moe(getattr(module, f"{stack}_moe")) if step > 0 else None}
  return out


def differences(stored: Any, expected: Any, prefix: str = "") -> list[str]:
  """'<field> <stored> vs <expected>' for each field that differs (dotted names, sorted); a
  sub-description present on one side only (an MoE stack vs a dense one) is one field."""
  if isinstance(stored, dict) and isinstance(expected, dict):
    return [d for key in sorted(set(stored) | set(expected)) if key != "format"
            for d in differences(stored.get(key), expected.get(key),
                                 f"{prefix}.{key}" if prefix else key)]
  if stored == expected:
    return []
  shown = lambda x: "{...}" if isinstance(x, dict) else x  # noqa: E731
  return [f"{prefix} {shown(stored)} vs {shown(expected)}"]


def read(step_dir: str) -> dict[str, Any] | None:
  """The description saved in checkpoint_<step> `step_dir`, or None (older or converted)."""
  item = epath.Path(step_dir) / orbax_utils.MODEL_ITEM
  if not item.is_dir():
    return None
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return checkpointer.restore(item)


def check(setting: str, step_dir: str, model: Any, abstract_params: Any) -> None:
  """The checkpoint at `step_dir` (checkpoint_<step>) belongs to `model`: its saved description
  (when it has one; else a one-line note) and its params' tree and shapes
  (abstract_params: the model's, e.g. Trainer.abstract_params).

  Raises SettingError('<setting>: ...') naming what differs. A checkpoint that cannot be read
  raises what reading it raised (restore_newest then skips it as corrupt).
  """
  stored = read(step_dir)
  if stored is None:
    logging.warning("%s has no model description (written before it existed, or converted): "
                    "only its parameter shapes are checked against the model", step_dir)
  else:
    diffs = differences(stored, describe(model))
    if diffs:
      shown = ", ".join(diffs[:_SHOWN]) + (f" and {len(diffs) - _SHOWN} more"
                                           if len(diffs) > _SHOWN else "")
      raise SettingError(setting, f"{step_dir} was saved by a different model: {shown} "
                                  "(checkpoint vs this model); use the model gin it was "
                                  "trained with")
  stored_params, _ = orbax_utils.params_metadata(step_dir)
  validation.checkpoint_matches(setting, step_dir, _shapes(stored_params),
                                _shapes(abstract_params))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(k): tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}
