"""HF transformers Switch Transformers (and dense T5) checkpoints <-> moe_jax params.

Import reads a `save_pretrained` directory (config.json + safetensors, or pytorch_model.bin) or
an in-memory model, and returns moe_jax params (nested dict of float32 numpy arrays, the tree of
`EncoderDecoderModel.get_initial_variables` unboxed) plus gin text that rebuilds the matching
model. Export writes params back in the HF state-dict layout.

Layout (PyTorch Linear weights are [out, in]; moe_jax kernels are [in, out]):
  shared.weight [v,m]                                   token_embedder/embedding
  {stack}.embed_tokens.weight [v,m] (when they differ)  {stack}_token_embedder/embedding
  lm_head.weight [v,m] (untied only)                    decoder/logits_dense [m,v]
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets,h]
                                                        {stack}/relpos_bias/rel_embedding [h,b]
  {stack}.block.N.layer.0.SelfAttention.{q,k,v}.weight [h·d,m]  layers_N/attention/query.. [m,h,d]
  {stack}.block.N.layer.0.SelfAttention.o.weight [m,h·d]         layers_N/attention/out [h,d,m]
  decoder.block.N.layer.1.EncDecAttention.*             layers_N/encoder_decoder_attention/*
  {stack}.block.N.layer.F.mlp.wi.weight [f,m] / wo      layers_N/mlp/wi [m,f] / wo [f,m]
  {stack}.block.N.layer.F.mlp.router.classifier.weight [e,m]      layers_N/mlp/router/w [m,e]
  {stack}.block.N.layer.F.mlp.experts.expert_J.wi.weight [f,m]    layers_N/mlp/wi[J] [m,f]
  layer norms: layer.0 -> pre_(self_)attention_layer_norm, decoder layer.1 ->
  pre_cross_attention_layer_norm, FFN layer -> pre_mlp_layer_norm; final_layer_norm ->
  encoder_norm / decoder_norm.
The FFN is layer.1 in the encoder and layer.2 in the decoder. Dense T5 checkpoints name it
`DenseReluDense` (gated: wi_0, wi_1) instead of `mlp`.

Semantics that match HF: sparse layer i iff i % sparse_step == 1 (or every layer for step 1);
relative attention bias only in block 0 of each stack (shared by the stack); a tied embedding
scales the decoder output by d_model^-0.5 before the head; the expert output is multiplied by
the router probability of the chosen expert (moe_jax's Switch combine weight). HF counts
expert capacity per sequence in tokens (config.expert_capacity): the gin includes
semantics/hf_switch.gin (one routing group per sequence, that fixed capacity), so a converted
model drops the tokens HF drops; capacity='moe_jax' keeps moe_jax's capacity factors per group
instead (for fine-tuning). transformers 5 saves tie_word_embeddings=False models with separate
encoder and decoder input embeddings; they become T5Config.shared_input_embedding=False.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping

import numpy as np

STACKS = ("encoder", "decoder")
_ATTN = {"q": "query", "k": "key", "v": "value"}
# HF activation names -> moe_jax activations (gelu in moe_jax is the tanh approximation).
_ACTIVATIONS = {"relu": ("relu",), "gelu_new": ("gelu",), "gelu_pytorch_tanh": ("gelu",),
                "silu": ("silu",), "swish": ("silu",)}


# ----------------------------------------------------------------------------- reading HF

def _config_dict(config: Any) -> dict[str, Any]:
  return dict(config) if isinstance(config, Mapping) else config.to_dict()


def read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, state dict of numpy arrays) from a `save_pretrained` directory."""
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  state: dict[str, np.ndarray] = {}
  shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if shards:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    for shard in shards:
      state.update(load_file(shard))
  else:
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
      raise FileNotFoundError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    import torch  # pylint: disable=import-outside-toplevel
    for shard in bins:
      for k, v in torch.load(shard, map_location="cpu", weights_only=True).items():
        state[k] = v.float().numpy()
  return config, state


def state_dict_to_numpy(model: Any) -> dict[str, np.ndarray]:
  """An in-memory PyTorch model's state dict as float32 numpy arrays."""
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _activations(config: Mapping[str, Any]) -> tuple[str, ...]:
  proj = config.get("feed_forward_proj")
  if proj is not None:  # T5Config: 'relu', 'gated-gelu', ...
    gated = proj.startswith("gated-")
    act = config.get("dense_act_fn") or proj.split("-")[-1]
    if act == "gelu" and gated:
      act = "gelu_new"  # T5Config maps gated-gelu to gelu_new (the tanh approximation)
  else:
    gated, act = False, config.get("dense_act_fn", "relu")
  if act not in _ACTIVATIONS:
    raise ValueError(f"HF activation {act!r} has no moe_jax equivalent; supported: "
                     f"{sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[act] + (("linear",) if gated else ())


def _is_tied(config: Mapping[str, Any]) -> bool:
  # transformers 5 T5Config records the v1.0/v1.1 difference as scale_decoder_outputs.
  if "scale_decoder_outputs" in config:
    return bool(config["scale_decoder_outputs"])
  return bool(config.get("tie_word_embeddings", True))


def _sparse_layers(state: Mapping[str, np.ndarray], stack: str) -> list[int]:
  pattern = re.compile(rf"{stack}\.block\.(\d+)\.layer\.\d+\.mlp\.router\.classifier\.weight")
  return sorted(int(m.group(1)) for k in state if (m := pattern.fullmatch(k)))


def sparse_step_for(sparse: list[int], num_layers: int) -> int:
  """The moe_jax sparse_step (0 none, 1 all, N: i % N == 1) that reproduces `sparse`."""
  from moe_jax.models import sparse_layers  # pylint: disable=import-outside-toplevel
  for step in range(0, max(num_layers, 1) + 1):
    if sparse_layers(num_layers, step) == sparse:
      return step
  raise ValueError(f"sparse layers {sparse} of {num_layers} follow no i % step == 1 pattern")


def _input_embeddings(state: Mapping[str, np.ndarray]) -> list[np.ndarray]:
  """[shared] when the encoder and decoder read one input embedding, else [encoder, decoder]
  (transformers 5 unties all three copies when tie_word_embeddings=False)."""
  enc, dec = (state.get(f"{stack}.embed_tokens.weight", state["shared.weight"])
              for stack in STACKS)
  return [enc] if np.array_equal(enc, dec) else [enc, dec]


def _num_layers(state: Mapping[str, np.ndarray], stack: str) -> int:
  blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{stack}\.block\.(\d+)\.", k))}
  return max(blocks) + 1 if blocks else 0


# ----------------------------------------------------------------------------- import

def hf_to_params(config: Any, state: Mapping[str, Any]) -> dict[str, Any]:
  """HF config + state dict -> moe_jax params (nested dict of float32 numpy arrays)."""
  config = _config_dict(config)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  if config.get("router_bias"):
    raise ValueError("router_bias=True checkpoints are not supported (moe_jax routers have no "
                     "bias)")
  h, d = config["num_heads"], config["d_kv"]
  m = config["d_model"]
  gated = len(_activations(config)) == 2

  def attention(prefix: str) -> dict[str, np.ndarray]:
    out = {name: state[f"{prefix}.{hf}.weight"].T.reshape(m, h, d) for hf, name in _ATTN.items()}
    out["out"] = state[f"{prefix}.o.weight"].T.reshape(h, d, m)
    return out

  def ffn(prefix: str) -> dict[str, np.ndarray]:
    if f"{prefix}.mlp.router.classifier.weight" in state:
      num_experts = config["num_experts"]
      experts = [f"{prefix}.mlp.experts.expert_{j}" for j in range(num_experts)]
      return {"router": {"w": state[f"{prefix}.mlp.router.classifier.weight"].T},
              "wi": np.stack([state[f"{e}.wi.weight"].T for e in experts]),
              "wo": np.stack([state[f"{e}.wo.weight"].T for e in experts])}
    module = "mlp" if f"{prefix}.mlp.wo.weight" in state else "DenseReluDense"
    wis = ("wi_0", "wi_1") if gated else ("wi",)
    out = {wi: state[f"{prefix}.{module}.{wi}.weight"].T for wi in wis}
    out["wo"] = state[f"{prefix}.{module}.wo.weight"].T
    return out

  embeddings = _input_embeddings(state)
  if len(embeddings) == 1:
    params: dict[str, Any] = {"token_embedder": {"embedding": embeddings[0]}}
  else:
    params = {f"{stack}_token_embedder": {"embedding": e} for stack, e in zip(STACKS, embeddings)}
  for stack in STACKS:
    blocks = {}
    for i in range(_num_layers(state, stack)):
      p = f"{stack}.block.{i}.layer"
      if stack == "encoder":
        blocks[f"layers_{i}"] = {
            "pre_attention_layer_norm": {"scale": state[f"{p}.0.layer_norm.weight"]},
            "attention": attention(f"{p}.0.SelfAttention"),
            "pre_mlp_layer_norm": {"scale": state[f"{p}.1.layer_norm.weight"]},
            "mlp": ffn(f"{p}.1")}
      else:
        blocks[f"layers_{i}"] = {
            "pre_self_attention_layer_norm": {"scale": state[f"{p}.0.layer_norm.weight"]},
            "self_attention": attention(f"{p}.0.SelfAttention"),
            "pre_cross_attention_layer_norm": {"scale": state[f"{p}.1.layer_norm.weight"]},
            "encoder_decoder_attention": attention(f"{p}.1.EncDecAttention"),
            "pre_mlp_layer_norm": {"scale": state[f"{p}.2.layer_norm.weight"]},
            "mlp": ffn(f"{p}.2")}
    bias = state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    blocks["relpos_bias"] = {"rel_embedding": bias.T}
    blocks[f"{stack}_norm"] = {"scale": state[f"{stack}.final_layer_norm.weight"]}
    params[stack] = blocks
  if not _is_tied(config):
    params["decoder"]["logits_dense"] = state["lm_head.weight"].T
  return params


CAPACITY_CHOICES = ("hf", "moe_jax")


def hf_to_gin(config: Any, state: Mapping[str, Any], capacity: str = "hf") -> str:
  """Gin text (a model gin: include + macro overrides) that builds the model `hf_to_params`
  fills. Sparse placement comes from the router weights actually present in `state`.

  capacity: 'hf' (default) routes as HF does (semantics/hf_switch.gin: a group per sequence,
  config.expert_capacity tokens per expert), so evaluation and decoding without training give
  HF's drops and logits; 'moe_jax' keeps moe_jax's capacity factors per routing group.
  """
  if capacity not in CAPACITY_CHOICES:
    raise ValueError(f"capacity={capacity!r} is not one of {CAPACITY_CHOICES}")
  config = _config_dict(config)
  n_enc, n_dec = _num_layers(state, "encoder"), _num_layers(state, "decoder")
  enc_step = sparse_step_for(_sparse_layers(state, "encoder"), n_enc)
  dec_step = sparse_step_for(_sparse_layers(state, "decoder"), n_dec)
  sparse = enc_step > 0 or dec_step > 0
  lines = [
      f"# Converted from a HF transformers {config.get('model_type', '?')} checkpoint by",
      "# moe_jax.checkpoints.hf_switch.",
      "from __gin__ import dynamic_registration",
      "",
      "from moe_jax import models",
      "",
      f"include 'models/{'switch_base' if sparse else 't5_base'}.gin'",
  ]
  if sparse and capacity == "hf":
    lines.append("include 'semantics/hf_switch.gin'")
  lines += [
      "",
      f"VOCAB_SIZE = {config['vocab_size']}",
      f"EMBED_DIM = {config['d_model']}",
      f"NUM_HEADS = {config['num_heads']}",
      f"HEAD_DIM = {config['d_kv']}",
      f"MLP_DIM = {config['d_ff']}",
      f"NUM_ENCODER_LAYERS = {n_enc}",
      f"NUM_DECODER_LAYERS = {n_dec}",
      f"ACTIVATIONS = {_activations(config)!r}",
      f"LOGITS_VIA_EMBEDDING = {_is_tied(config)}",
      f"DROPOUT_RATE = {float(config.get('dropout_rate', 0.1))}",
      "ACTIVATION_DTYPE = 'float32'",
  ]
  if sparse:
    lines += [
        f"NUM_EXPERTS = {config['num_experts']}",
        f"ENCODER_SPARSE_STEP = {enc_step}",
        f"DECODER_SPARSE_STEP = {dec_step}",
        f"ROUTER_JITTER_NOISE = {float(config.get('router_jitter_noise', 0.0))}",
        f"AUX_LOSS_FACTOR = {float(config.get('router_aux_loss_coef', 0.01))}",
        f"ROUTER_Z_LOSS_FACTOR = {float(config.get('router_z_loss_coef', 0.0))}",
    ]
    if capacity == "hf":
      lines.append(f"EXPERT_CAPACITY = {int(config['expert_capacity'])}  # tokens per expert "
                   "per sequence")
    else:
      lines += [
          f"# HF expert_capacity = {config.get('expert_capacity')} tokens per expert per "
          "sequence; here TRAIN/EVAL_CAPACITY_FACTOR set capacity per routing group."]
  lines += [
      "",
      "models.T5Config:",
      f"  shared_input_embedding = {len(_input_embeddings(state)) == 1}",
      f"  relative_attention_num_buckets = {config.get('relative_attention_num_buckets', 32)}",
      f"  relative_attention_max_distance = {config.get('relative_attention_max_distance', 128)}",
      f"  layer_norm_epsilon = {float(config.get('layer_norm_epsilon', 1e-6))}",
      "",
  ]
  return "\n".join(lines)


def load_hf_switch(source: Any, capacity: str = "hf") -> tuple[dict[str, Any], str]:
  """A `save_pretrained` directory or an in-memory SwitchTransformersForConditionalGeneration
  (or T5ForConditionalGeneration) -> (moe_jax params, gin text). capacity: see hf_to_gin."""
  if isinstance(source, (str, os.PathLike)):
    config, state = read_hf_dir(os.fspath(source))
  else:
    config, state = source.config.to_dict(), state_dict_to_numpy(source)
  return hf_to_params(config, state), hf_to_gin(config, state, capacity)


# ----------------------------------------------------------------------------- export

def params_to_hf(params: Mapping[str, Any], layout: str = "switch") -> dict[str, np.ndarray]:
  """moe_jax params -> HF state dict (numpy, PyTorch [out, in] layout), including the tied
  copies HF lists (encoder/decoder.embed_tokens, and lm_head when tied). layout 'switch' names
  dense FFNs `mlp` (SwitchTransformers), 't5' names them `DenseReluDense` (T5)."""
  if layout not in ("switch", "t5"):
    raise ValueError(f"layout={layout!r} is not 'switch' or 't5'")
  if "token_embedder" in params:
    embedding = np.asarray(params["token_embedder"]["embedding"], np.float32)
    state = {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding,
             "decoder.embed_tokens.weight": embedding}
  else:  # separate input embeddings (transformers 5 untied); HF's `shared` is the encoder's
    state = {f"{stack}.embed_tokens.weight":
             np.asarray(params[f"{stack}_token_embedder"]["embedding"], np.float32)
             for stack in STACKS}
    state["shared.weight"] = state["encoder.embed_tokens.weight"]
    embedding = state["decoder.embed_tokens.weight"]  # what a tied head would read

  def attention(prefix: str, a: Mapping[str, Any]) -> None:
    for hf, name in _ATTN.items():
      w = np.asarray(a[name], np.float32)
      state[f"{prefix}.{hf}.weight"] = w.reshape(w.shape[0], -1).T
    wo = np.asarray(a["out"], np.float32)
    state[f"{prefix}.o.weight"] = wo.reshape(-1, wo.shape[-1]).T

  def ffn(prefix: str, mlp: Mapping[str, Any]) -> None:
    if "router" in mlp:
      state[f"{prefix}.mlp.router.classifier.weight"] = np.asarray(mlp["router"]["w"]).T
      for j in range(mlp["wi"].shape[0]):
        state[f"{prefix}.mlp.experts.expert_{j}.wi.weight"] = np.asarray(mlp["wi"][j]).T
        state[f"{prefix}.mlp.experts.expert_{j}.wo.weight"] = np.asarray(mlp["wo"][j]).T
      return
    module = "mlp" if layout == "switch" else "DenseReluDense"
    for name, w in mlp.items():
      state[f"{prefix}.{module}.{name}.weight"] = np.asarray(w, np.float32).T

  for stack in STACKS:
    s = params[stack]
    num_layers = len([k for k in s if k.startswith("layers_")])
    for i in range(num_layers):
      layer, pre = s[f"layers_{i}"], f"{stack}.block.{i}.layer"
      if stack == "encoder":
        state[f"{pre}.0.layer_norm.weight"] = layer["pre_attention_layer_norm"]["scale"]
        attention(f"{pre}.0.SelfAttention", layer["attention"])
        state[f"{pre}.1.layer_norm.weight"] = layer["pre_mlp_layer_norm"]["scale"]
        ffn(f"{pre}.1", layer["mlp"])
      else:
        state[f"{pre}.0.layer_norm.weight"] = layer["pre_self_attention_layer_norm"]["scale"]
        attention(f"{pre}.0.SelfAttention", layer["self_attention"])
        state[f"{pre}.1.layer_norm.weight"] = layer["pre_cross_attention_layer_norm"]["scale"]
        attention(f"{pre}.1.EncDecAttention", layer["encoder_decoder_attention"])
        state[f"{pre}.2.layer_norm.weight"] = layer["pre_mlp_layer_norm"]["scale"]
        ffn(f"{pre}.2", layer["mlp"])
    state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        np.asarray(s["relpos_bias"]["rel_embedding"]).T)
    state[f"{stack}.final_layer_norm.weight"] = s[f"{stack}_norm"]["scale"]
  state["lm_head.weight"] = (np.asarray(params["decoder"]["logits_dense"]).T
                             if "logits_dense" in params["decoder"] else embedding)
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()}


def save_params(params: Mapping[str, Any], directory: str) -> str:
  """Write params as an orbax checkpoint at directory/checkpoint_0/params (the trainer's
  layout, so `orbax_utils.resolve_path(directory)` finds it). Written to a temporary sibling
  and renamed into place, so a checkpoint is never half-written. Returns the step directory."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from moe_jax.checkpoints import orbax_utils  # pylint: disable=import-outside-toplevel
  directory = os.path.abspath(directory)
  final = orbax_utils.step_dir(directory, 0)
  if os.path.exists(final):
    raise FileExistsError(f"{final} already exists")
  tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{os.getpid()}")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, orbax_utils.ITEMS[0]), dict(params))
  checkpointer.wait_until_finished()
  os.rename(tmp, final)
  return final
