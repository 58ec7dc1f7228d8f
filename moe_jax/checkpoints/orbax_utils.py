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
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import adafactor as adafactor_lib

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


def data_state_from_path(path: str) -> dict[str, Any] | None:
  """The data position saved with an explicit checkpoint path (see resolve_path), or None when
  the checkpoint has none (e.g. one converted from another framework)."""
  model_dir, step = resolve_path(path)
  if not (epath.Path(step_dir(model_dir, step)) / "data").is_dir():
    return None
  reader = read_only_manager(model_dir)
  try:
    return reader.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  finally:
    reader.close()


def params_metadata(path: str) -> tuple[Any, int]:
  """(tree of jax.ShapeDtypeStruct, step) of the params stored at an explicit path."""
  model_dir, step = resolve_path(path)
  item = epath.Path(step_dir(model_dir, step)) / "params"
  tree = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree), step


# --- sparse upcycling (Komatsuzaki et al. 2022) ---------------------------------------------
#
# At pod scale nothing may be built whole on one device: switch_base's expert weights are 29 GB
# in float32. The dense checkpoint is read straight into shardings derived from the MoE model's
# (restore_for_upcycle), and `upcycle_params` runs inside one jitted function whose outputs have
# the MoE params' shardings (trainer.Trainer.compile_init), so XLA writes each device's experts
# from its own shard of the dense kernel.

_EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")
# (kind, dense leaf): 'copied' (same path and shape) or 'tiled' (expert weight [e, ...] <- [...]).
UpcycleSources = dict[tuple[str, ...], tuple[str, tuple[str, ...]]]


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


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def upcycle_sources(dense_params: Any, moe_params: Any) -> UpcycleSources:
  """Where each MoE leaf comes from, read off the shapes alone (arrays or ShapeDtypeStructs).

  A MoE leaf with the same path and shape in the dense tree is 'copied'; an expert weight
  [e, ...] is 'tiled' from the dense MLP kernel of its layer; any other leaf (routers) is absent:
  it keeps its fresh initialization. ValueError when no expert weight finds a dense kernel.
  """
  dense_flat = _flat(dense_params)
  sources: UpcycleSources = {}
  for path, fresh in _flat(moe_params).items():
    dense = dense_flat.get(path)
    if dense is not None and tuple(dense.shape) == tuple(fresh.shape):
      sources[path] = ("copied", path)
    elif path[-1] in _EXPERT_WEIGHTS and len(fresh.shape) >= 3:
      match = _dense_mlp_match(path, dense_flat, tuple(fresh.shape))
      if match is not None:
        sources[path] = ("tiled", match)
  if not any(kind == "tiled" for kind, _ in sources.values()):
    raise ValueError("sparse upcycling found no dense MLP kernel for any expert weight; is the "
                     "checkpoint a dense model with the same layer names?")
  return sources


def upcycle_report(sources: UpcycleSources, moe_params: Any) -> dict[str, list[str]]:
  """{'copied': [...], 'tiled': ['moe <- dense', ...], 'fresh': [...]} paths, for the log."""
  report: dict[str, list[str]] = {"copied": [], "tiled": [], "fresh": []}
  for path in _flat(moe_params):
    kind, source = sources.get(path, ("fresh", path))
    key = "/".join(path)
    report[kind].append(f"{key} <- {'/'.join(source)}" if kind == "tiled" else key)
  return report


def upcycle_params(dense_params: Any, moe_params: Any, sources: UpcycleSources) -> Any:
  """Dense params + freshly initialized MoE params -> upcycled MoE params (jit-traceable).

  dense_params: the dense leaves `sources` names (others are ignored). Copied leaves take the
  MoE leaf's dtype; each expert weight [e, ...] becomes e copies of its dense kernel [...].
  Under jit with the MoE shardings as out_shardings, every device broadcasts only its experts.
  """
  dense_flat = _flat(dense_params)
  out = {}
  for path, fresh in _flat(moe_params).items():
    if path not in sources:
      out[path] = fresh
      continue
    kind, source = sources[path]
    value = jnp.asarray(dense_flat[source], fresh.dtype)
    out[path] = value if kind == "copied" else jnp.broadcast_to(value[None], fresh.shape)
  return flax.traverse_util.unflatten_dict(out)


def dense_shapes(abstract_moe_params: Any) -> Any:
  """The dense model a MoE model upcycles from, as ShapeDtypeStructs (for planning): routers
  left out, each expert weight [e, ...] as its dense kernel [...]."""
  out = {}
  for path, leaf in _flat(abstract_moe_params).items():
    if path[-1] in _EXPERT_WEIGHTS and len(leaf.shape) >= 3:
      out[path] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    elif "router" not in path:
      out[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def upcycle_target(dense_params: Any, abstract_moe_params: Any) -> tuple[Any, UpcycleSources]:
  """(the dense leaves the MoE model uses as ShapeDtypeStructs with shardings, sources).

  dense_params: the dense checkpoint's shapes and dtypes (kept: upcycle_params casts inside the
  jitted step). abstract_moe_params: the MoE params with shardings. A copied leaf takes its MoE
  leaf's sharding, a tiled kernel [...] the expert weight's without the expert dimension
  ([e,m,h] P('expert', None, 'model') -> [m,h] P(None, 'model')), so no device reads more of a
  dense leaf than it writes.
  """
  sources = upcycle_sources(dense_params, abstract_moe_params)
  dense_flat, moe_flat = _flat(dense_params), _flat(abstract_moe_params)
  target = {}
  for moe_path, (kind, source) in sources.items():
    sharding = moe_flat[moe_path].sharding
    if kind == "tiled":
      sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    leaf = dense_flat[source]
    target[source] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  return flax.traverse_util.unflatten_dict(target), sources


def restore_for_upcycle(path: str, abstract_moe_params: Any) -> tuple[Any, UpcycleSources]:
  """(dense params, sources) for sparse upcycling from an explicit checkpoint path.

  Only the dense leaves the MoE model uses are read (upcycle_target), each straight into its
  sharding at its stored dtype: orbax reads each device's slice of the file, so no device holds
  more of a leaf than its sharding gives it.
  """
  stored, _ = params_metadata(path)
  target, sources = upcycle_target(stored, abstract_moe_params)
  model_dir, step = resolve_path(path)
  item = epath.Path(step_dir(model_dir, step)) / "params"
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return ocp.PyTreeCheckpointer().restore(item, args=args), sources


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A jax key path as the names orbax stores it under (dict keys, fields, list indices)."""
  return tuple(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)))
               for k in path)


def _named_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
  return {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_opt_state_for_upcycle(path: str, dense_target: Any) -> Any | None:
  """A dense checkpoint's optimizer state as stored (nested dicts and lists), None when it has
  none (a converted checkpoint). A leaf with the shape of the dense param its path ends with
  (Adam's moments, a full second moment) is read into that param's sharding in dense_target
  (the dense params of restore_for_upcycle, or upcycle_target's shapes), the rest (factored
  statistics, step counts) replicated."""
  model_dir, step = resolve_path(path)
  item = epath.Path(step_dir(model_dir, step)) / "train_state"
  if not item.is_dir():
    return None
  stored = ocp.StandardCheckpointer().metadata(item).item_metadata.tree["opt_state"]
  params = _named_leaves(dense_target)
  replicated = NamedSharding(next(iter(params.values())).sharding.mesh, P())

  def target(key_path, leaf):
    names = _names(key_path)
    param = next((params[names[i:]] for i in range(len(names)) if names[i:] in params), None)
    sharding = (param.sharding if param is not None and param.shape == tuple(leaf.shape)
                else replicated)
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)
  target_tree = {"opt_state": jax.tree_util.tree_map_with_path(
      lambda p, x: target(p[1:], x), stored, is_leaf=lambda x: hasattr(x, "shape"))}
  args = ocp.args.PyTreeRestore(item=target_tree, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(
                                    target_tree))
  return ocp.PyTreeCheckpointer().restore(item, args=args)["opt_state"]


def upcycle_opt_state(dense_opt: Any, fresh_opt: Any, params: Any, param_axes: Any,
                      sources: UpcycleSources) -> Any:
  """The upcycled model's optimizer state from the dense model's (jit-traceable): the paper
  carries the optimizer state over with the weights.

  dense_opt: the dense run's state as stored (restore_opt_state_for_upcycle). fresh_opt: this
  run's optimizer.init(params); params, param_axes: the upcycled params and their logical axes.
  A per-param leaf (its path ends with a param's) comes from its source param's state: copied,
  or for an expert weight e copies of its dense kernel's (Adafactor's factored statistics
  through the kernel's second moment, adafactor.tiled_statistics); routers keep theirs. Every
  other leaf (step counts, so Adafactor's decay goes on) is copied. ValueError when the dense
  state lacks a leaf or has another shape: it was trained with another optimizer.
  """
  dense = _named_leaves(dense_opt)
  axes = {_names(p): tuple(a) for p, a in
          jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=lambda x: isinstance(x, P))[0]}
  shapes = {k: v.shape for k, v in _named_leaves(params).items()}

  def stored(names):
    if names not in dense:
      raise ValueError(f"the dense checkpoint's optimizer state has no {'/'.join(names)}: "
                       "it was trained with another optimizer")
    return dense[names]

  def fit(value, fresh, names):
    if tuple(value.shape) != tuple(fresh.shape):
      raise ValueError(f"the dense checkpoint's optimizer state {'/'.join(names)} has shape "
                       f"{tuple(value.shape)}, this run's {tuple(fresh.shape)}: it was trained "
                       "with another optimizer")
    return jnp.asarray(value, fresh.dtype)

  def adafactor_state(prefix, state):
    stats = ("v_row", "v_col", "v")
    fresh = {k: _named_leaves(getattr(state, k)) for k in stats}
    new = {k: dict(v) for k, v in fresh.items()}
    for param, (kind, source) in sources.items():
      old = {k: stored(prefix + (k, *source)) for k in stats}
      if kind == "tiled":
        v = adafactor_lib.second_moment(old["v_row"], old["v_col"], old["v"], shapes[param][1:])
        old = adafactor_lib.tiled_statistics(v, shapes[param][0], axes[param],
                                             {k: fresh[k][param] for k in stats},
                                             name="/".join(param))
      for k in stats:
        new[k][param] = fit(old[k], fresh[k][param], prefix + (k, *param))
    count = fit(stored(prefix + ("count",)), state.count, prefix + ("count",))
    return state._replace(count=count, **{
        k: jax.tree_util.tree_map_with_path(lambda p, _, k=k: new[k][_names(p)],
                                            getattr(state, k)) for k in stats})

  def leaf(names, fresh):
    param = next((names[i:] for i in range(len(names)) if names[i:] in shapes), None)
    if param is None:
      return fit(stored(names), fresh, names)
    if param not in sources:
      return fresh
    kind, source = sources[param]
    value = stored(names[:len(names) - len(param)] + source)
    if kind == "tiled":
      value = jnp.broadcast_to(value[None], (shapes[param][0], *value.shape))
    return fit(value, fresh, names)

  is_adafactor = lambda x: isinstance(x, adafactor_lib.ScaleByAdafactorState)  # noqa: E731
  flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_opt, is_leaf=is_adafactor)
  return jax.tree_util.tree_unflatten(treedef, [
      adafactor_state(_names(p), x) if is_adafactor(x) else leaf(_names(p), x)
      for p, x in flat])


# --- dense students of MoE teachers (Switch Transformer Sec. 5) -------------------------------


def dense_student_params(moe_params: Any, dense_params: Any) -> tuple[Any, dict[str, list[str]]]:
  """MoE teacher params + freshly initialized dense params -> the dense student's initial params.

  The reverse of upcycle_params, as the Switch paper distils: every dense leaf with the same path
  and shape in the teacher (attention, norms, embeddings, the dense MLPs of the dense layers) is
  copied; the dense MLP of each layer where the teacher has experts keeps its fresh
  initialization (the teacher's expert weights and routers are not used). Returns (params,
  report) with report keys 'copied' and 'fresh'.
  """
  moe_flat, dense_flat = _flat(moe_params), _flat(dense_params)
  out, report = {}, {"copied": [], "fresh": []}
  for path, fresh in dense_flat.items():
    teacher = moe_flat.get(path)
    if teacher is not None and tuple(teacher.shape) == tuple(fresh.shape):
      # A copy: the train step donates the student's buffers and reads the teacher's.
      out[path] = jnp.array(teacher, fresh.dtype, copy=True)
      report["copied"].append("/".join(path))
    else:
      out[path] = fresh
      report["fresh"].append("/".join(path))
  if not report["copied"]:
    raise ValueError("the teacher shares no weight with the dense student; is the checkpoint a "
                     "model with the same layer names and dimensions?")
  return flax.traverse_util.unflatten_dict(out), report
