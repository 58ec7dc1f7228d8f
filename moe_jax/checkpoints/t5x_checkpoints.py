"""t5x checkpoints (Orbax, or the older msgpack + tensorstore format) <-> moe_jax params.

Reads and writes t5x checkpoint directories without t5x installed (orbax, tensorstore and
msgpack directly). A t5x checkpoint_<step> directory holds the train state's state dict
{'target': params, 'state': {'step', 'param_states'}}:
  Orbax (t5x's default, OrbaxCheckpointManagerInterface): checkpoint_<step>/state, an orbax
    PyTree (OCDBT), plus checkpoint_<step>/dataset.
  tensorstore (t5x's legacy Checkpointer; Google's released Switch / T5X checkpoints):
    checkpoint_<step>/checkpoint, a msgpack file {'version': 3, 'optimizer': state dict} whose
    large leaves are zarr tensorstore specs with paths relative to the step directory
    ('target.encoder.layers_0.attention.query.kernel'); small leaves are stored inline.

Parameter names: flaxformer's T5 / MoE encoder-decoder (t5x/contrib/moe + flaxformer's gins)
versus moe_jax's tree (the t5x bridge keeps moe_jax's own names, read and written as they are):
  token_embedder/embedding [v,m]                        token_embedder/embedding
  {stack}/token_embedder/embedding (separate)           {stack}_token_embedder/embedding
  {stack}/relpos_bias/rel_embedding [h,buckets]         the same
  {stack}/{stack}_norm/scale, layers_N/*_layer_norm/scale   the same
  layers_N/{attention,self_attention,encoder_decoder_attention}/{query,key,value}/kernel
    [m,h·d]                                             .../{query,key,value} [m,h,d]
  .../out/kernel [h·d,m]                                .../out [h,d,m]
  layers_N/mlp/{wi,wi_0,wi_1,wo}/kernel (dense)         layers_N/mlp/{wi,wi_0,wi_1,wo}
  layers_N/mlp/router/router_weights/w/kernel [m,e]     layers_N/mlp/router/w
  layers_N/mlp/expert/{wi,wi_0,wi_1,wo}/kernel [e,..]   layers_N/mlp/{wi,wi_0,wi_1,wo}
  decoder/logits_dense/kernel [m,v] (untied)            decoder/logits_dense
Anything else (router bias, per-layer position biases, ...) is refused with one error that
names every such parameter.

Semantics (gin/semantics/flaxformer_model.gin): flaxformer's MoeLayer (capacity, groups,
losses; semantics/flaxformer.gin), with padding entering the router as zeros and routed like
real tokens, as in flaxformer's whole models. Sparse layers: flaxformer's MIXED layout puts an
MoE layer at i % f == f - 1 (f = layers / sparse layers); moe_jax's i % step == 1 reproduces
f = 1 and f = 2 (switch_*.gin: every other layer); a placement no step reproduces (e.g.
tokens_choose_base.gin's f = 4, or a BOTTOM layout) is refused by `flaxformer_to_gin`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from moe_jax.checkpoints import hf_switch

FORMATS = ("orbax", "tensorstore")
NAMES = ("flaxformer", "moe_jax")
STATE_ITEM = "state"  # t5x's Orbax item
MSGPACK_FILE = "checkpoint"  # t5x's legacy msgpack file
_LEGACY_VERSION = 3  # t5x.checkpoints.VERSION
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
_ATTENTION = r"(?:attention|self_attention|encoder_decoder_attention)"
_MLP_WEIGHTS = r"(?:wi|wi_\d+|wo)"


# ----------------------------------------------------------------------------- flat trees

def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}; a tensorstore spec (a dict with 'driver') is a leaf."""
  return traverse_util.flatten_dict(
      dict(tree), sep="/", is_leaf=lambda _, x: isinstance(x, Mapping) and "driver" in x)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ----------------------------------------------------------------------------- reading

def find_step_dir(path: str) -> str:
  """A checkpoint_<step> directory (as given), or a model dir's latest step (either format)."""
  path = os.path.abspath(os.path.expanduser(path))
  if _STEP_DIR.fullmatch(os.path.basename(path)):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no checkpoint at {path}")
    return path
  names = os.listdir(path) if os.path.isdir(path) else []
  steps = sorted((int(m.group(1)), name) for name in names
                 if (m := _STEP_DIR.fullmatch(name)) and _format_or_none(os.path.join(path, name)))
  if not steps:
    raise FileNotFoundError(f"{path} is neither a t5x checkpoint_<step> directory nor a model "
                            "dir holding one")
  return os.path.join(path, steps[-1][1])


def _format_or_none(step_dir: str) -> str | None:
  if os.path.isfile(os.path.join(step_dir, MSGPACK_FILE)):
    return "tensorstore"
  if os.path.isdir(os.path.join(step_dir, STATE_ITEM)):
    return "orbax"
  return None


def checkpoint_format(step_dir: str) -> str:
  """'orbax' (checkpoint_<step>/state) or 'tensorstore' (checkpoint_<step>/checkpoint)."""
  fmt = _format_or_none(step_dir)
  if fmt is None:
    raise FileNotFoundError(f"{step_dir} has neither a t5x Orbax item '{STATE_ITEM}/' nor a "
                            f"legacy msgpack file '{MSGPACK_FILE}'")
  return fmt


def _read_orbax(step_dir: str) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  item = os.path.join(step_dir, STATE_ITEM)
  handler = ocp.PyTreeCheckpointHandler()
  metadata = handler.metadata(epath.Path(item)).tree
  # Host numpy arrays: no mesh or sharding of the writer is needed.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return ocp.Checkpointer(handler).restore(
      item, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _read_tensorstore(step_dir: str) -> dict[str, Any]:
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  from flax import serialization  # pylint: disable=import-outside-toplevel
  with open(os.path.join(step_dir, MSGPACK_FILE), "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  # Version 0 is a plain flax state dict; later versions wrap it under 'optimizer'.
  state = contents["optimizer"] if contents.get("version", 0) else contents

  def read(name: str, leaf: Any) -> Any:
    if not (isinstance(leaf, Mapping) and "driver" in leaf):
      return leaf
    spec = dict(leaf)
    kvstore = dict(spec.get("kvstore", {}))
    relative = kvstore.get("path", spec.get("path"))
    if kvstore.get("driver", "file") != "file" or relative is None:
      raise ValueError(f"{name}: only local tensorstore files are read (spec {leaf}); copy "
                       "the checkpoint to a local directory first")
    spec["kvstore"] = {"driver": "file", "path": os.path.join(step_dir, relative)}
    spec.pop("path", None)  # tensorstore < 0.1.14 kept the path at the top level
    return ts.open(spec, open=True).result().read().result()

  return unflatten({k: read(k, v) for k, v in flatten(state).items()})


def read_t5x_checkpoint(path: str, with_optimizer: bool = False) -> dict[str, Any]:
  """A t5x checkpoint (step dir, or model dir: its latest step) of either format ->
  {'target': params (nested numpy), 'step': int, 'format': 'orbax'|'tensorstore'} plus
  'param_states' (the optimizer's per-parameter state) when with_optimizer."""
  step_dir = find_step_dir(path)
  fmt = checkpoint_format(step_dir)
  state = _read_orbax(step_dir) if fmt == "orbax" else _read_tensorstore(step_dir)
  if "target" not in state:
    raise ValueError(f"{step_dir}: no 'target' (params) in the checkpoint; top-level keys: "
                     f"{sorted(state)}")
  out = {"target": state["target"], "step": int(np.asarray(state["state"]["step"])),
         "format": fmt}
  if with_optimizer:
    out["param_states"] = state["state"].get("param_states")
  return out


# ----------------------------------------------------------------------------- names

def detect_names(params: Mapping[str, Any]) -> str:
  """'flaxformer' when any parameter is a flaxformer leaf (kernel, router_weights), else
  'moe_jax'."""
  flaxformer = any(k.endswith("/kernel") or "/router_weights/" in k for k in flatten(params))
  return "flaxformer" if flaxformer else "moe_jax"


def _num_heads(flat: Mapping[str, Any], stack: str, key: str) -> int:
  bias = flat.get(f"{stack}/relpos_bias/rel_embedding")
  if bias is None:
    raise ValueError(f"{key}: the attention heads come from {stack}/relpos_bias/rel_embedding, "
                     "which the checkpoint lacks")
  return int(np.shape(bias)[0])


def flaxformer_to_moe_jax(target: Mapping[str, Any]) -> dict[str, Any]:
  """flaxformer-named params (a t5x 'target') -> moe_jax params (nested float32 numpy)."""
  flat = {k: np.asarray(v) for k, v in flatten(target).items()}
  out, unknown = {}, []
  for key, value in flat.items():
    stack = key.split("/")[0]
    if m := re.fullmatch(r"(encoder|decoder)/token_embedder/embedding", key):
      out[f"{m.group(1)}_token_embedder/embedding"] = value
    elif re.fullmatch(r"token_embedder/embedding|(encoder|decoder)/relpos_bias/rel_embedding"
                      r"|(encoder/encoder|decoder/decoder)_norm/scale"
                      r"|(encoder|decoder)/layers_\d+/pre_\w+_layer_norm/scale", key):
      out[key] = value
    elif key == "decoder/logits_dense/kernel":
      out["decoder/logits_dense"] = value
    elif m := re.fullmatch(rf"(\w+/layers_\d+/{_ATTENTION})/(query|key|value|out)/kernel", key):
      if value.ndim == 2:  # flaxformer joins heads and head_dim into one axis
        h = _num_heads(flat, stack, key)
        value = (value.reshape(value.shape[0], h, -1) if m.group(2) != "out"
                 else value.reshape(h, -1, value.shape[-1]))
      out[f"{m.group(1)}/{m.group(2)}"] = value
    elif m := re.fullmatch(rf"(\w+/layers_\d+/mlp)/(?:expert/)?({_MLP_WEIGHTS})/kernel", key):
      out[f"{m.group(1)}/{m.group(2)}"] = value
    elif m := re.fullmatch(r"(\w+/layers_\d+/mlp)/router/router_weights/w/kernel", key):
      out[f"{m.group(1)}/router/w"] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{len(unknown)} flaxformer parameter(s) have no moe_jax equivalent: "
                     f"{', '.join(sorted(unknown))}")
  return unflatten({k: v.astype(np.float32) for k, v in out.items()})


def moe_jax_to_flaxformer(params: Mapping[str, Any]) -> dict[str, Any]:
  """moe_jax params -> flaxformer-named params (the 't5x target' flaxformer's model restores)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  out, unknown = {}, []
  for key, value in flat.items():
    if m := re.fullmatch(r"(encoder|decoder)_token_embedder/embedding", key):
      out[f"{m.group(1)}/token_embedder/embedding"] = value
    elif re.fullmatch(r"token_embedder/embedding|(encoder|decoder)/relpos_bias/rel_embedding"
                      r"|(encoder/encoder|decoder/decoder)_norm/scale"
                      r"|(encoder|decoder)/layers_\d+/pre_\w+_layer_norm/scale", key):
      out[key] = value
    elif key == "decoder/logits_dense":
      out["decoder/logits_dense/kernel"] = value
    elif m := re.fullmatch(rf"(\w+/layers_\d+/{_ATTENTION})/(query|key|value|out)", key):
      value = (value.reshape(value.shape[0], -1) if m.group(2) != "out"
               else value.reshape(-1, value.shape[-1]))
      out[f"{m.group(1)}/{m.group(2)}/kernel"] = value
    elif m := re.fullmatch(rf"(\w+/layers_\d+/mlp)/({_MLP_WEIGHTS})", key):
      expert = "expert/" if f"{m.group(1)}/router/w" in flat else ""
      out[f"{m.group(1)}/{expert}{m.group(2)}/kernel"] = value
    elif m := re.fullmatch(r"(\w+/layers_\d+/mlp)/router/w", key):
      out[f"{m.group(1)}/router/router_weights/w/kernel"] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{len(unknown)} moe_jax parameter(s) have no flaxformer equivalent: "
                     f"{', '.join(sorted(unknown))}")
  return unflatten(out)


def to_moe_jax(target: Mapping[str, Any], names: str = "auto") -> dict[str, Any]:
  """A t5x target with flaxformer or moe_jax names ('auto': `detect_names`) -> moe_jax params."""
  if names == "auto":
    names = detect_names(target)
  if names not in NAMES:
    raise ValueError(f"names={names!r} is not 'auto' or one of {NAMES}")
  if names == "flaxformer":
    return flaxformer_to_moe_jax(target)
  return unflatten({k: np.asarray(v, np.float32) for k, v in flatten(target).items()})


def check_params(params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raise one ValueError naming every missing, unexpected or wrongly shaped parameter of
  `params` against `expected` (a tree of arrays or jax.ShapeDtypeStruct)."""
  got, want = flatten(params), flatten(expected)
  problems = [f"missing {k} {tuple(np.shape(want[k]))}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k}: shape {tuple(np.shape(got[k]))} != model's {tuple(np.shape(want[k]))}"
               for k in sorted(got.keys() & want.keys())
               if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))]
  if problems:
    raise ValueError(f"checkpoint does not fit the model ({len(problems)} problem(s)): "
                     + "; ".join(problems))


# ----------------------------------------------------------------------------- config

# flaxformer's model gins (flaxformer/t5x/configs/moe/models/) -> what the shapes cannot say.
PRESETS: dict[str, dict[str, Any]] = {
    # switch_*.gin: top-1, relu experts and dense layers, no batch prioritized routing.
    "switch": dict(activations=("relu",), k=1, train_cf=1.25, eval_cf=2.0, group_size=8192,
                   encoder_bpr=False),
    # tokens_choose_*.gin: top-2, gated-gelu, batch prioritized routing in the encoder.
    "tokens_choose": dict(activations=("gelu", "linear"), k=2, train_cf=1.25, eval_cf=2.0,
                          group_size=4096, encoder_bpr=True),
}


def _stack_layers(flat: Mapping[str, Any], stack: str) -> list[int]:
  return sorted({int(m.group(1)) for k in flat if (m := re.match(rf"{stack}/layers_(\d+)/", k))})


def _sparse(flat: Mapping[str, Any], stack: str) -> list[int]:
  return sorted({int(m.group(1)) for k in flat
                 if (m := re.fullmatch(rf"{stack}/layers_(\d+)/mlp/router/w", k))})


def flaxformer_to_gin(params: Mapping[str, Any], preset: str = "switch",
                      source: str = "") -> str:
  """Gin text that builds the moe_jax model for `params` (moe_jax names, e.g. from
  `to_moe_jax`) with flaxformer's semantics: dimensions, layers, experts, sparse placement,
  gating and tied / untied logits come from the shapes; routing hyper-parameters and
  activations from `preset` (the flaxformer model gin family, one of PRESETS). Append gin
  bindings to override any of them (e.g. GROUP_SIZE for switch_c)."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
  p = PRESETS[preset]
  flat = flatten(params)
  shared = "token_embedder/embedding" in flat
  embedding = np.shape(flat["token_embedder/embedding" if shared
                            else "encoder_token_embedder/embedding"])
  num_heads, num_buckets = np.shape(flat["encoder/relpos_bias/rel_embedding"])
  head_dim = np.shape(flat["encoder/layers_0/attention/query"])[-1]
  gated = any(k.endswith("/mlp/wi_0") for k in flat)
  if gated != (len(p["activations"]) == 2):
    raise ValueError(f"preset {preset!r} has activations {p['activations']} but the checkpoint's "
                     f"feed-forwards are {'gated (wi_0, wi_1)' if gated else 'not gated (wi)'}")
  wi = "wi_0" if gated else "wi"
  dense = [np.shape(v) for k, v in flat.items() if k.endswith(f"/mlp/{wi}") and np.ndim(v) == 2]
  experts = [np.shape(v) for k, v in flat.items() if k.endswith(f"/mlp/{wi}") and np.ndim(v) == 3]
  n_enc, n_dec = (len(_stack_layers(flat, s)) for s in hf_switch.STACKS)
  steps = {}
  for stack, n in zip(hf_switch.STACKS, (n_enc, n_dec)):
    sparse = _sparse(flat, stack)
    try:
      steps[stack] = hf_switch.sparse_step_for(sparse, n)
    except ValueError:
      raise ValueError(f"{stack}: MoE layers {sparse} of {n} follow no moe_jax placement "
                       "(layer i is sparse iff i % step == 1; flaxformer's MIXED layout with "
                       "more than 2 layers per MoE layer puts them elsewhere)") from None
  lines = [
      f"# Converted from a t5x / flaxformer checkpoint{' ' + source if source else ''} by",
      f"# moe_jax.checkpoints.t5x_checkpoints (preset {preset!r}).",
      "from __gin__ import dynamic_registration",
      "",
      "from moe_jax import models",
      "from moe_jax import routing",
      "",
      "include 'models/switch_base.gin'",
      "include 'semantics/flaxformer_model.gin'",
      "",
      f"VOCAB_SIZE = {embedding[0]}",
      f"EMBED_DIM = {embedding[1]}",
      f"NUM_HEADS = {num_heads}",
      f"HEAD_DIM = {head_dim}",
      f"MLP_DIM = {dense[0][-1] if dense else experts[0][-1]}",
      f"NUM_ENCODER_LAYERS = {n_enc}",
      f"NUM_DECODER_LAYERS = {n_dec}",
      f"ACTIVATIONS = {tuple(p['activations'])!r}",
      f"LOGITS_VIA_EMBEDDING = {'decoder/logits_dense' not in flat}",
      "DROPOUT_RATE = 0.0  # flaxformer's moe.gin",
      "ACTIVATION_DTYPE = 'float32'  # flaxformer's gins compute in bfloat16",
      f"ENCODER_SPARSE_STEP = {steps['encoder']}",
      f"DECODER_SPARSE_STEP = {steps['decoder']}",
  ]
  if experts:
    lines += [
        f"NUM_EXPERTS = {experts[0][0]}",
        f"EXPERT_MLP_DIM = {experts[0][-1]}",
        f"NUM_SELECTED_EXPERTS = {p['k']}",
        f"TRAIN_CAPACITY_FACTOR = {p['train_cf']}",
        f"EVAL_CAPACITY_FACTOR = {p['eval_cf']}",
        "MIN_EXPERT_CAPACITY = 4  # flaxformer's MoeLayer default",
        f"GROUP_SIZE = {p['group_size']}",
        "ROUTER_JITTER_NOISE = 0.0",
        "EXPERT_DROPOUT_RATE = 0.0",
        "AUX_LOSS_FACTOR = 0.01",
        "ROUTER_Z_LOSS_FACTOR = 0.0",
        "Z_LOSS = 1e-4",
        f"encoder/routing.TokensChooseRouter.batch_prioritized = {p['encoder_bpr']}",
    ]
  lines += [
      "",
      "models.T5Config:",
      f"  shared_input_embedding = {shared}",
      f"  relative_attention_num_buckets = {num_buckets}",
      "  relative_attention_max_distance = 128",
      "",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- writing

def _state_dict(target: Mapping[str, Any], step: int,
                param_states: Mapping[str, Any] | None) -> dict[str, Any]:
  state: dict[str, Any] = {"step": np.asarray(step, np.int32)}
  if param_states is not None:
    state["param_states"] = param_states
  return {"target": dict(target), "state": state}


def _write_orbax(model_dir: str, state: Mapping[str, Any], step: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  # The layout t5x's OrbaxCheckpointManagerInterface writes: one OCDBT PyTree item 'state'.
  options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(
      model_dir, options=options,
      item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=True)})
  try:
    arrays = jax.tree.map(jax.numpy.asarray, dict(state))
    manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave(arrays)}))
    manager.wait_until_finished()
  finally:
    manager.close()


def _write_tensorstore(model_dir: str, state: Mapping[str, Any], step: int) -> None:
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  from flax import serialization  # pylint: disable=import-outside-toplevel
  final = os.path.join(model_dir, f"checkpoint_{step}")
  tmp = f"{final}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  written = {}
  for name, value in flatten(state).items():
    value = np.asarray(value)
    if value.ndim == 0:  # scalars (the step) stay inline, as t5x keeps unpartitioned leaves
      written[name] = value
      continue
    relative = name.replace("/", ".")
    spec = {"driver": "zarr", "dtype": value.dtype.name,
            "kvstore": {"driver": "file", "path": relative},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(value.shape),
                         "chunks": list(value.shape)}}
    store = ts.open(dict(spec, kvstore={"driver": "file", "path": os.path.join(tmp, relative)}),
                    create=True, delete_existing=True).result()
    store.write(value).result()
    written[name] = spec
  with open(os.path.join(tmp, MSGPACK_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(
        {"version": _LEGACY_VERSION, "optimizer": unflatten(written)}))
  os.rename(tmp, final)


def write_t5x_checkpoint(model_dir: str, target: Mapping[str, Any], step: int,
                         fmt: str = "orbax", param_states: Mapping[str, Any] | None = None
                         ) -> str:
  """Write `target` (params, any names) as MODEL_DIR/checkpoint_<step> in t5x's `fmt`:
  'orbax' (what t5x's train writes and restores by default) or 'tensorstore' (its legacy
  Checkpointer; t5x restores it too). The state dict is {'target', 'state': {'step'}} plus
  param_states when given: t5x restores it into an InferenceState as it is, and into a
  training state with RestoreCheckpointConfig(strict=False) (fresh optimizer state), as
  fine-tuning from another checkpoint does. Returns the step directory."""
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  final = os.path.join(model_dir, f"checkpoint_{step}")
  if os.path.exists(final):
    raise FileExistsError(f"{final} already exists")
  state = _state_dict(target, step, param_states)
  if fmt == "orbax":
    _write_orbax(model_dir, state, step)
  else:
    os.makedirs(model_dir, exist_ok=True)
    _write_tensorstore(model_dir, state, step)
  return final


# ----------------------------------------------------------------------------- one call

def load_t5x(path: str, preset: str = "switch", names: str = "auto"
             ) -> tuple[dict[str, Any], str, int]:
  """A t5x checkpoint -> (moe_jax params, gin text, step). The params are checked against the
  model the gin builds (one error names every missing, unexpected or misshapen parameter)."""
  import jax  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from flax.core import meta  # pylint: disable=import-outside-toplevel
  from moe_jax import config  # pylint: disable=import-outside-toplevel
  ckpt = read_t5x_checkpoint(path)
  params = to_moe_jax(ckpt["target"], names)
  gin_text = flaxformer_to_gin(params, preset, source=f"at step {ckpt['step']}")
  with tempfile.NamedTemporaryFile("w", suffix=".gin") as f:
    f.write(gin_text)
    f.flush()
    model = config.build_model([f.name])
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  check_params(params, meta.unbox(abstract["params"]))
  return params, gin_text, ckpt["step"]
