"""HF transformers parity: Switch / T5 checkpoints converted to moe_jax give the same logits,
export round-trips exactly, the converter script writes a restorable checkpoint, and moe_jax's
top-2 router makes NllbMoeTop2Router's decisions."""
import importlib.util
import os

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import NllbMoeConfig, SwitchTransformersConfig
from transformers import SwitchTransformersForConditionalGeneration, T5Config
from transformers import T5ForConditionalGeneration
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

from moe_jax import config
from moe_jax import routing
from moe_jax.checkpoints import hf_switch
from moe_jax.checkpoints import orbax_utils
from moe_jax.models import sparse_layers

VOCAB = 48
REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def switch_model(seed, retie_inputs=True, **overrides):
  kwargs = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2,
                num_decoder_layers=2, num_heads=4, num_experts=4, num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=1, expert_capacity=10_000, router_jitter_noise=0.0,
                dropout_rate=0.0, relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**kwargs)).eval()
  if retie_inputs and not model.config.tie_word_embeddings:
    # transformers 5 unties every tied pair here, input embeddings included; T5 v1.1 and
    # Switch-C untie only the output head, so share the input embedding again.
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
  return model


def t5_model(seed, tied, **overrides):
  kwargs = dict(vocab_size=VOCAB, d_model=24, d_kv=6, d_ff=40, num_layers=2,
                num_decoder_layers=3, num_heads=3, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                tie_word_embeddings=tied)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(T5Config(**kwargs)).eval()
  if not tied:
    # transformers 5 ties lm_head to the input embedding even for T5 v1.1 configs (it only
    # turns off the d_model^-0.5 output scaling); give the head its own weights as in v1.1.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, kwargs["d_model"]))
  return model


def inputs(seed, b=2, le=9, ld=7):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, VOCAB, (b, le)).astype(np.int32)
  enc[-1, le - 3:] = 0  # encoder padding
  tgt = rng.integers(2, VOCAB, (b, ld)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


def hf_logits(model, enc, dec_in):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc, dtype=torch.long),
                 attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec_in, dtype=torch.long)).logits.numpy()


def build_from_gin_text(gin_text, tmp_path, bindings=()):
  path = tmp_path / "model.gin"
  path.write_text(gin_text)
  return config.build_model([str(path)], list(bindings))


PARITY_CASES = {
    # name: (builder, sparse layers expected (encoder, decoder))
    "switch_relu_tied_step2": (lambda: switch_model(0), ([1], [1])),
    "switch_relu_untied_all_sparse": (
        lambda: switch_model(1, tie_word_embeddings=False, num_sparse_encoder_layers=2,
                             num_sparse_decoder_layers=2, num_heads=2, d_kv=16), ([0, 1], [0, 1])),
    "switch_gelu_new_mixed_steps": (
        lambda: switch_model(2, dense_act_fn="gelu_new", num_layers=4, num_decoder_layers=3,
                             num_sparse_encoder_layers=2, num_sparse_decoder_layers=3,
                             d_model=24, num_heads=3, d_kv=10), ([1, 3], [0, 1, 2])),
    "t5_v1_0_relu_tied": (lambda: t5_model(3, tied=True), ([], [])),
    "t5_v1_1_gated_gelu_untied": (
        lambda: t5_model(4, tied=False, feed_forward_proj="gated-gelu"), ([], [])),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_converted_model_matches_hf_logits(case, tmp_path):
  builder, (enc_sparse, dec_sparse) = PARITY_CASES[case]
  hf = builder()
  params, gin_text = hf_switch.load_hf_switch(hf)
  model = build_from_gin_text(gin_text, tmp_path)
  c = model.module.config
  assert sparse_layers(c.num_encoder_layers, c.encoder_sparse_step) == enc_sparse
  assert sparse_layers(c.num_decoder_layers, c.decoder_sparse_step) == dec_sparse

  enc, dec_in, tgt = inputs(0)
  expected = hf_logits(hf, enc, dec_in)
  ours = np.asarray(model.module.apply({"params": params}, enc, dec_in, tgt, deterministic=True))
  diff = np.abs(ours - expected).max()
  print(f"{case}: max |logits - HF| = {diff:.2e} (|logits| up to {np.abs(expected).max():.1f})")
  assert diff <= 1e-4


@pytest.mark.parametrize("case,layout", [("switch_relu_tied_step2", "switch"),
                                         ("switch_relu_untied_all_sparse", "switch"),
                                         ("t5_v1_1_gated_gelu_untied", "t5")])
def test_export_round_trips_exactly(case, layout):
  hf = PARITY_CASES[case][0]()
  state = hf_switch.state_dict_to_numpy(hf)
  params, _ = hf_switch.load_hf_switch(hf)
  exported = hf_switch.params_to_hf(params, layout=layout)
  assert set(exported) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = hf_switch.hf_to_params(hf.config, exported)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)

  # HF itself accepts the export and computes the same logits.
  fresh = type(hf)(hf.config).eval()
  if "untied" in case and layout == "t5":
    fresh.lm_head.weight = torch.nn.Parameter(torch.zeros_like(fresh.lm_head.weight))
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  enc, dec_in, _ = inputs(1)
  np.testing.assert_array_equal(hf_logits(fresh, enc, dec_in), hf_logits(hf, enc, dec_in))


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "convert_hf_switch", os.path.join(REPO, "scripts", "convert_hf_switch.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convert_script_writes_restorable_checkpoint_and_gin(tmp_path):
  hf = PARITY_CASES["switch_relu_untied_all_sparse"][0]()
  hf_dir, out = tmp_path / "hf", tmp_path / "out"
  hf.save_pretrained(hf_dir)
  _load_script().main(["--hf_dir", str(hf_dir), "--out", str(out)])
  assert sorted(os.listdir(out)) == ["checkpoint_0", "model.gin"]  # no temporaries left

  model = build_from_gin_text((out / "model.gin").read_text(), tmp_path)
  abstract = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.key(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}))
  abstract = flax.core.meta.unbox(abstract)["params"]
  params, step = orbax_utils.restore_params_from_path(str(out / "checkpoint_0"), abstract)
  assert step == 0
  expected, _ = hf_switch.load_hf_switch(hf)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), expected)

  enc, dec_in, tgt = inputs(2)
  ours = model.module.apply({"params": params}, enc, dec_in, tgt, deterministic=True)
  assert np.abs(np.asarray(ours) - hf_logits(hf, enc, dec_in)).max() <= 1e-4

  with pytest.raises(FileExistsError):  # never overwrites an existing checkpoint
    hf_switch.save_params(expected, str(out))


@pytest.mark.parametrize("normalize_before_drop", [True, False])
@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_top2_router_matches_nllb_moe(normalize_before_drop, batch_prioritized):
  s, m, e, capacity = 24, 16, 4, 5  # capacity binds: 48 assignments for 20 slots
  hf_config = NllbMoeConfig(
      d_model=m, num_experts=e, expert_capacity=capacity, second_expert_policy="all",
      normalize_router_prob_before_dropping=normalize_before_drop,
      batch_prioritized_routing=batch_prioritized, moe_eval_capacity_token_fraction=-1.0)
  torch.manual_seed(0)
  hf_router = NllbMoeTop2Router(hf_config).eval()
  x = torch.randn(s, m)
  padding = torch.zeros(s, dtype=torch.bool)
  padding[-3:] = True  # padding takes no capacity
  with torch.no_grad():
    hf_top1, hf_combine, _ = hf_router(x, padding_mask=padding)

  # The NLLB preset, with the two router options NllbMoeConfig varies here.
  moe = config.build_model(
      ["models/switch_tiny.gin", "semantics/nllb_top2.gin"],
      ["VOCAB_SIZE = 100", f"NUM_EXPERTS = {e}", f"EXPERT_CAPACITY = {capacity}",
       f"routing.TokensChooseRouter.normalize_before_drop = {normalize_before_drop}",
       f"routing.TokensChooseRouter.batch_prioritized = {batch_prioritized}"]).module.encoder_moe
  assert moe.group_shape(1, s, 1) == (1, s) and moe.expert_capacity(s, True) == capacity
  router = moe.router
  w = hf_router.classifier.weight.detach().numpy().T  # [m, e]
  out = router.apply({"params": {"w": jnp.asarray(w)}}, jnp.asarray(x.numpy())[None],
                     capacity=capacity, valid=jnp.asarray(~padding.numpy())[None],
                     deterministic=True)
  onehot = jax.nn.one_hot(out.expert_index[0], e)  # [s, k, e]
  combine = np.asarray(jnp.einsum("sk,ske->se", out.gate[0], onehot))
  top1_kept = np.asarray(onehot[:, 0] * out.kept[0, :, :1])
  np.testing.assert_array_equal(top1_kept, hf_top1.numpy())
  np.testing.assert_allclose(combine, hf_combine.numpy(), rtol=1e-6, atol=1e-7)
  assert 0 < float((hf_combine > 0).sum()) < 2 * (s - 3)  # some second choices were dropped


def test_transformers5_untied_model_converts(tmp_path):
  """transformers 5 saves tie_word_embeddings=False with three separate embeddings (shared,
  encoder, decoder): the converter gives each stack its own input embedding."""
  hf = switch_model(5, retie_inputs=False, tie_word_embeddings=False)
  assert not np.array_equal(hf.encoder.embed_tokens.weight.detach(),
                            hf.decoder.embed_tokens.weight.detach())
  hf_dir, out = tmp_path / "hf", tmp_path / "out"
  hf.save_pretrained(hf_dir)
  _load_script().main(["--hf_dir", str(hf_dir), "--out", str(out)])
  params, gin_text = hf_switch.load_hf_switch(str(hf_dir))
  assert {"encoder_token_embedder", "decoder_token_embedder"} <= set(params)
  model = build_from_gin_text(gin_text, tmp_path)
  enc, dec_in, tgt = inputs(3)
  ours = model.module.apply({"params": params}, enc, dec_in, tgt, deterministic=True)
  assert np.abs(np.asarray(ours) - hf_logits(hf, enc, dec_in)).max() <= 1e-4
  exported = hf_switch.params_to_hf(params)
  for stack in ("encoder", "decoder"):
    np.testing.assert_array_equal(exported[f"{stack}.embed_tokens.weight"],
                                  getattr(hf, stack).embed_tokens.weight.detach().numpy())


def _kept_per_layer(model, params, enc, dec_in, tgt):
  """{'encoder/layers_1/mlp': kept [b, l] bool} of every MoE layer, teacher-forced."""
  kept = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, routing.Router) and context.method_name == "__call__":
      kept["/".join(context.module.path[:-1])] = out.kept.any(-1)
    return out

  with flax.linen.intercept_methods(record):
    model.module.apply({"params": params}, enc, dec_in, tgt, deterministic=True)
  return {k: np.asarray(v) for k, v in kept.items()}


def _hf_kept_per_layer(hf, enc, dec_in):
  """The same from HF's routers (their capacity-masked one-hot expert_index)."""
  kept, hooks = {}, []
  for stack in ("encoder", "decoder"):
    for i, block in enumerate(getattr(hf, stack).block):
      mlp = block.layer[-1].mlp
      if hasattr(mlp, "router"):
        name = f"{stack}/layers_{i}/mlp"
        hooks.append(mlp.router.register_forward_hook(
            lambda mod, args, out, name=name: kept.__setitem__(name, out[0].sum(-1).numpy() > 0)))
  hf_logits(hf, enc, dec_in)
  for h in hooks:
    h.remove()
  return kept


def test_converted_model_drops_like_hf_when_capacity_binds(tmp_path):
  """The converter's default gin routes as HF: with 2 slots per expert per sequence, the same
  tokens are dropped, the logits agree and greedy decoding gives HF's tokens."""
  hf = switch_model(6, expert_capacity=2)
  with torch.no_grad():  # PAD and EOS never win the argmax: greedy decodes every step
    hf.shared.weight[:2] = 0.0
  params, gin_text = hf_switch.load_hf_switch(hf)
  model = build_from_gin_text(gin_text, tmp_path)
  enc, dec_in, tgt = inputs(4, b=3, le=12, ld=10)
  real = {"encoder": enc > 0, "decoder": np.ones(dec_in.shape, bool)}
  kept, hf_kept = _kept_per_layer(model, params, enc, dec_in, tgt), _hf_kept_per_layer(
      hf, enc, dec_in)
  assert sorted(kept) == sorted(hf_kept) == ["decoder/layers_1/mlp", "encoder/layers_1/mlp"]
  for name, k in kept.items():
    mask = real[name.split("/")[0]]
    np.testing.assert_array_equal(k[mask], hf_kept[name][mask], err_msg=name)
    assert not k[mask].all(), name  # capacity binds
  ours = np.asarray(model.module.apply({"params": params}, enc, dec_in, tgt, deterministic=True))
  assert np.abs(ours - hf_logits(hf, enc, dec_in)).max() <= 1e-4

  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in}
  greedy = np.asarray(model.predict_batch(params, batch))
  with torch.no_grad():
    hf_greedy = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                            attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                            max_new_tokens=dec_in.shape[1], do_sample=False, num_beams=1,
                            decoder_start_token_id=0, eos_token_id=1,
                            pad_token_id=0).numpy()[:, 1:]  # drop the start token
  hf_greedy = np.pad(hf_greedy, ((0, 0), (0, dec_in.shape[1] - hf_greedy.shape[1])))
  np.testing.assert_array_equal(greedy, hf_greedy)
  assert len(np.unique(greedy)) >= 3  # not a constant output


def test_converted_model_router_losses_equal_hf(tmp_path):
  """Without padding (HF routes padding as tokens), aux and router z-losses equal HF's
  coef · (encoder + decoder) losses."""
  hf = switch_model(7, expert_capacity=2, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
  params, gin_text = hf_switch.load_hf_switch(hf)
  model = build_from_gin_text(gin_text, tmp_path)
  enc, dec_in, tgt = inputs(5, b=3, le=12, ld=10)
  enc[enc == 0] = 5
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(enc, dtype=torch.long),
             decoder_input_ids=torch.tensor(dec_in, dtype=torch.long),
             labels=torch.tensor(tgt, dtype=torch.long), output_router_logits=True)
  _, metrics = model.eval_fn(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                                      "decoder_target_tokens": tgt})
  np.testing.assert_allclose(
      metrics["aux_loss"], 0.01 * float(out.encoder_aux_loss + out.decoder_aux_loss), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["router_z_loss"], 0.001 * float(out.encoder_z_loss + out.decoder_z_loss),
      rtol=1e-5)


def test_capacity_option_keeps_moe_jax_capacity(tmp_path):
  hf = switch_model(8, expert_capacity=2)
  _, gin_text = hf_switch.load_hf_switch(hf, capacity="moe_jax")
  assert "semantics/hf_switch.gin" not in gin_text
  moe = build_from_gin_text(gin_text, tmp_path).module.encoder_moe
  assert (moe.group_rule, moe.fixed_capacity, moe.eval_capacity_factor) == ("ceil", None, 2.0)
  moe = build_from_gin_text(hf_switch.load_hf_switch(hf)[1], tmp_path).module.encoder_moe
  assert (moe.group_rule, moe.fixed_capacity) == ("sequence", 2)
