"""orbax checkpoints for moe_jax train states, plus sparse upcycling of dense checkpoints.

Layout (t5x-like): MODEL_DIR/checkpoint_<step>/ holds these orbax items:
  params        the model parameters (optionally saved in a smaller dtype)
  train_state   {'step', 'rng', 'opt_state'}
  data          the input pipeline position (JSON, from data.DatasetIterator.get_state())
  model         the model's structure (JSON, checkpoints/model_description.py); optional:
                older and converted checkpoints lack it
Eval, infer and sparse upcycling read `params` alone. orbax writes each step into a temporary
directory and renames it when every item is done, so a killed run never leaves a partial
checkpoint behind. Paths may be local or remote (gs://...; etils.epath, as orbax).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax
import jax
from etils import epath
import jax.numpy as jnp
import orbax.checkpoint as ocp

STEP_PREFIX = "checkpoint"
ITEMS = ("params", "train_state", "data")  # every complete checkpoint has these
MODEL_ITEM = "model"
_ALL_ITEMS = ITEMS + (MODEL_ITEM,)


def absolute(path: str) -> str:
  """A local path made absolute (user ~ expanded); a remote one (gs://...) as it is."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def step_dir(model_dir: str, step: int) -> str:
  return str(epath.Path(model_dir) / f"{STEP_PREFIX}_{step}")


def make_manager(directory: str, *, max_to_keep: int | None = None,
                 save_timeout_s: int = 1200) -> ocp.CheckpointManager:
  """An asynchronous CheckpointManager over MODEL_DIR with the checkpoint_<step> naming.

  Saving cadence is the trainer's business (it calls `save` with force=True), so the manager
  itself saves whenever asked. save_timeout_s: how long a background save waits for the other
  processes' writes (orbax's default, 20 min); after a write failed on one process, the others
  wait this long before they give up.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, step_prefix=STEP_PREFIX, create=True,
      enable_async_checkpointing=True, cleanup_tmp_directories=True,
      async_options=ocp.AsyncOptions(timeout_secs=save_timeout_s))
  return ocp.CheckpointManager(absolute(directory), options=options, item_names=_ALL_ITEMS)


def _cast_floats(tree: Any, dtype: Any) -> Any:
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def save(manager: ocp.CheckpointManager, step: int, *, params: Any, train_state: Any,
         data_state: Mapping[str, Any] | None, params_dtype: Any = None,
         model_description: Mapping[str, Any] | None = None) -> None:
  """Starts an (asynchronous) save of one step; `params_dtype` e.g. jnp.bfloat16 halves it."""
  items = dict(params=ocp.args.StandardSave(_cast_floats(params, params_dtype)),
               train_state=ocp.args.StandardSave(train_state),
               data=ocp.args.JsonSave(dict(data_state or {})))
  if model_description is not None:
    items[MODEL_ITEM] = ocp.args.JsonSave(dict(model_description))
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_params: Any,
            abstract_train_state: Any | None = None, with_data: bool = False
            ) -> tuple[Any, Any | None, dict | None]:
  """Restores (params, train_state or None, data state or None) at `step`.

  Abstract trees are jax.ShapeDtypeStruct with shardings: arrays come back sharded that way
  and cast to those dtypes (a bfloat16 checkpoint restores into float32 params).
  """
  items = dict(params=ocp.args.StandardRestore(abstract_params))
  if abstract_train_state is not None:
    items["train_state"] = ocp.args.StandardRestore(abstract_train_state)
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  out = manager.restore(step, args=ocp.args.Composite(**items))
  data = out.get("data") if with_data else None
  return out["params"], out.get("train_state"), data


def resolve_path(path: str) -> tuple[str, int]:
  """An explicit checkpoint path -> (model dir, step).

  Accepts a step directory (`.../checkpoint_1000`) or a model dir (its latest step is used).
  """
  path = epath.Path(absolute(path))
  match = re.fullmatch(rf"{STEP_PREFIX}_(\d+)", path.name)
  if match:
    if not path.is_dir():
      raise FileNotFoundError(f"no checkpoint at {path}")
    return str(path.parent), int(match.group(1))
  steps = latest_steps(str(path))
  if not steps:
    raise FileNotFoundError(f"no checkpoint_<step> directory in {path}")
  return str(path), steps[-1]


def latest_steps(model_dir: str) -> list[int]:
  """Finished checkpoint steps in `model_dir`, ascending (orbax's temporaries are skipped)."""
  root = epath.Path(model_dir)
  if not root.is_dir():
    return []
  steps = []
  for child in root.iterdir():
    match = re.fullmatch(rf"{STEP_PREFIX}_(\d+)", child.name)
    if match and (child / "params").is_dir():
      steps.append(int(match.group(1)))
  return sorted(steps)


def read_only_manager(model_dir: str) -> ocp.CheckpointManager:
  """A manager that restores from another run's MODEL_DIR and never writes there."""
  options = ocp.CheckpointManagerOptions(step_prefix=STEP_PREFIX, read_only=True, create=False,
                                         save_interval_steps=0)
  return ocp.CheckpointManager(model_dir, options=options, item_names=_ALL_ITEMS)


def restore_params_from_path(path: str, abstract_params: Any) -> tuple[Any, int]:
  """Params of an explicit checkpoint path (see resolve_path) -> (params, step)."""
  model_dir, step = resolve_path(path)
  item = epath.Path(step_dir(model_dir, step)) / "params"
  return ocp.StandardCheckpointer().restore(item, abstract_params), step


def params_metadata(path: str) -> tuple[Any, int]:
  """(tree of jax.ShapeDtypeStruct, step) of the params stored at an explicit path."""
  model_dir, step = resolve_path(path)
  item = epath.Path(step_dir(model_dir, step)) / "params"
  tree = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree), step


# --- sparse upcycling (Komatsuzaki et al. 2022) ---------------------------------------------

_EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")


def _dense_mlp_match(moe_path: tuple[str, ...], dense_flat: Mapping[tuple[str, ...], Any],
                     shape: tuple[int, ...]) -> tuple[str, ...] | None:
  """The dense MLP weight an expert weight [e, ...] starts from: the dense leaf of the same name
  and shape [...] sharing the longest path prefix, at least the stack and the layer
  (`encoder/layers_1/mlp/wi` [m,h] for `encoder/layers_1/mlp/wi` [e,m,h])."""
  best, best_len = None, 1
  for path, value in dense_flat.items():
    if path[-1] != moe_path[-1] or tuple(value.shape) != shape[1:]:
      continue
    common = next((i for i, (a, b) in enumerate(zip(path, moe_path)) if a != b),
                  min(len(path), len(moe_path)))
    if common > best_len:
      best, best_len = path, common
  return best


def upcycle_params(dense_params: Any, moe_params: Any) -> tuple[Any, dict[str, list[str]]]:
  """Dense params + freshly initialized MoE params -> upcycled MoE params.

  Every MoE leaf with the same path and shape in the dense tree is copied; each expert weight
  [e, ...] becomes e copies of the dense MLP kernel of its layer; everything else (routers) keeps
  its fresh initialization. Returns (params, report) with report keys 'copied', 'tiled', 'fresh'.
  """
  dense_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dense_params))
  moe_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(moe_params))
  out, report = {}, {"copied": [], "tiled": [], "fresh": []}
  for path, fresh in moe_flat.items():
    key = "/".join(path)
    dense = dense_flat.get(path)
    if dense is not None and tuple(dense.shape) == tuple(fresh.shape):
      out[path] = jnp.asarray(dense, fresh.dtype)
      report["copied"].append(key)
      continue
    if path[-1] in _EXPERT_WEIGHTS and fresh.ndim >= 3:
      match = _dense_mlp_match(path, dense_flat, tuple(fresh.shape))
      if match is not None:
        kernel = jnp.asarray(dense_flat[match], fresh.dtype)
        out[path] = jnp.broadcast_to(kernel[None], fresh.shape)
        report["tiled"].append(f"{key} <- {'/'.join(match)}")
        continue
    out[path] = fresh
    report["fresh"].append(key)
  if not report["tiled"]:
    raise ValueError("sparse upcycling found no dense MLP kernel for any expert weight; is the "
                     "checkpoint a dense model with the same layer names?")
  return flax.traverse_util.unflatten_dict(out), report
