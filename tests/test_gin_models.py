"""Every model gin parses and builds; parameter counts against an independent formula, the
papers' headline sizes and (where HF can build the model) HF transformers on the meta device."""
import glob
import os

import flax
import gin
import jax
import numpy as np
import pytest
import torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers import T5Config, T5ForConditionalGeneration

from moe_jax import config
from moe_jax import models
from moe_jax import routing

GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin", "models")
GIN_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(GIN_DIR, "*.gin")))
SHAPES = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}
# Tiny gins read the data's vocabulary size; building every file needs no vocabulary.
FIXED_VOCAB = ["VOCAB_SIZE = 2100"]


def build(gin_file, bindings=()):
  config.parse_gin([f"models/{gin_file}"], list(bindings))
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def macro(name):
  value = gin.query_parameter(f"%{name}")
  # A macro defined as another macro (EXPERT_MLP_DIM = %MLP_DIM) is a reference to a macro.
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn()
  return value


def abstract_params(model):
  return jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), SHAPES))["params"]


def formula_count(vocab, d_model, heads, d_kv, d_ff, n_enc, n_dec, gated, tied, experts,
                  enc_step, dec_step, expert_d_ff=None, buckets=32):
  """Parameters of a T5 / Switch encoder-decoder, counted from its dimensions."""
  def num_sparse(n, step):  # layers 1, 1+step, 1+2·step, ... (every layer for step 1)
    return 0 if step == 0 else (n if step == 1 else len(range(1, n, step)))
  attention = 4 * d_model * heads * d_kv  # q, k, v, o
  ffn = (3 if gated else 2) * d_model * d_ff
  expert_ffn = ffn if expert_d_ff is None else (3 if gated else 2) * d_model * expert_d_ff
  moe = experts * expert_ffn + d_model * experts  # experts + router
  total = vocab * d_model + (0 if tied else d_model * vocab)  # embedding (+ untied head)
  for n, step, attentions, norms in ((n_enc, enc_step, 1, 2), (n_dec, dec_step, 2, 3)):
    s = num_sparse(n, step)
    total += n * (attentions * attention + norms * d_model)  # attention + layer norms
    total += (n - s) * ffn + s * moe
    total += buckets * heads + d_model  # relative position bias (one per stack), final norm
  return total


def gin_formula_count():
  gated = len(macro("ACTIVATIONS")) == 2
  try:
    experts, enc_step, dec_step, expert_d_ff = (
        macro("NUM_EXPERTS"), macro("ENCODER_SPARSE_STEP"), macro("DECODER_SPARSE_STEP"),
        macro("EXPERT_MLP_DIM"))
  except ValueError:  # dense gins define no expert macros
    experts, enc_step, dec_step, expert_d_ff = 0, 0, 0, None
  return formula_count(
      macro("VOCAB_SIZE"), macro("EMBED_DIM"), macro("NUM_HEADS"), macro("HEAD_DIM"),
      macro("MLP_DIM"), macro("NUM_ENCODER_LAYERS"), macro("NUM_DECODER_LAYERS"), gated,
      macro("LOGITS_VIA_EMBEDDING"), experts, enc_step, dec_step, expert_d_ff)


def test_all_expected_gin_files_exist():
  expected = {"switch_base", "switch_base_8", "switch_base_16", "switch_base_32",
              "switch_base_64", "switch_base_256", "switch_large", "switch_xxl", "switch_c",
              "gshard_top2_base", "expert_choice_base", "t5_base", "t5_large", "t5_1_1_base",
              "t5_1_1_large", "t5_tiny", "switch_tiny", "gshard_tiny"}
  assert expected <= {f[:-len(".gin")] for f in GIN_FILES}


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_gin_builds_and_counts_params(gin_file):
  model = build(gin_file, FIXED_VOCAB)
  assert isinstance(model, models.EncoderDecoderModel)
  count = models.count_params(abstract_params(model))
  assert count == gin_formula_count()


# Switch Transformer paper (Fedus et al. 2021), Table 9. All use the 32128-entry T5 vocabulary
# (32100 pieces padded to a multiple of 128), as these gins do.
PAPER_SIZES = {"switch_base.gin": 7.4e9, "switch_large.gin": 26.3e9, "switch_xxl.gin": 395e9,
               "switch_c.gin": 1571e9}


@pytest.mark.parametrize("gin_file", sorted(PAPER_SIZES))
def test_paper_configs_match_headline_sizes(gin_file):
  count = models.count_params(abstract_params(build(gin_file)))
  assert count == pytest.approx(PAPER_SIZES[gin_file], rel=0.01)


def _hf_meta_count(model_cls, hf_config):
  with torch.device("meta"):
    hf = model_cls(hf_config)
  return sum(p.numel() for p in hf.parameters())  # tied tensors are listed once


def test_switch_base_8_count_equals_hf():
  model = build("switch_base_8.gin")
  hf_config = SwitchTransformersConfig(
      vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
      num_heads=12, num_experts=8, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)
  assert models.count_params(abstract_params(model)) == _hf_meta_count(
      SwitchTransformersForConditionalGeneration, hf_config)


def test_t5_base_count_equals_hf():
  model = build("t5_base.gin")
  hf_config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                       num_heads=12, feed_forward_proj="relu")
  assert models.count_params(abstract_params(model)) == _hf_meta_count(
      T5ForConditionalGeneration, hf_config)


def test_switch_c_dimensions():
  model = build("switch_c.gin")
  c = model.module.config
  assert (c.num_encoder_layers, c.num_decoder_layers, c.emb_dim, c.num_heads, c.head_dim,
          c.mlp_dim) == (15, 15, 2080, 30, 64, 6144)
  assert (c.encoder_sparse_step, c.decoder_sparse_step, c.logits_via_embedding) == (1, 1, False)
  moe = model.module.encoder_moe
  assert (moe.num_experts, moe.train_capacity_factor, moe.eval_capacity_factor) == (2048, 1.0, 2.0)


def test_switch_xxl_is_gated_untied_with_eval_capacity_4():
  model = build("switch_xxl.gin")
  c = model.module.config
  assert c.activations == ("gelu", "linear") and not c.logits_via_embedding
  moe = model.module.decoder_moe
  assert moe.activations == ("gelu", "linear") and moe.eval_capacity_factor == 4.0


def test_switch_base_routing_and_losses():
  model = build("switch_base.gin")
  moe = model.module.encoder_moe
  assert isinstance(moe.router, routing.TokensChooseRouter)
  assert moe.router.num_selected_experts == 1 and not moe.router.normalize_gates
  assert (moe.train_capacity_factor, moe.eval_capacity_factor) == (1.25, 2.0)
  assert model.aux_loss_factor == 0.01 and model.z_loss == 1e-4
  c = model.module.config
  assert c.activations == ("relu",) and c.logits_via_embedding


def test_gshard_routing():
  for gin_file in ("gshard_top2_base.gin", "gshard_tiny.gin"):
    model = build(gin_file, FIXED_VOCAB)
    for moe in (model.module.encoder_moe, model.module.decoder_moe):
      r = moe.router
      assert (r.num_selected_experts, r.second_expert_policy, r.normalize_gates) == (2, "random",
                                                                                     True)
      assert r.capacity_k == 2


def test_expert_choice_only_in_the_encoder():
  model = build("expert_choice_base.gin")
  assert isinstance(model.module.encoder_moe.router, routing.ExpertsChooseRouter)
  decoder = model.module.decoder_moe
  assert isinstance(decoder.router, routing.TokensChooseRouter)
  assert not decoder.router.batch_prioritized


def test_dense_baselines_have_no_moe():
  for gin_file in ("t5_base.gin", "t5_large.gin", "t5_1_1_base.gin", "t5_1_1_large.gin",
                   "t5_tiny.gin"):
    model = build(gin_file, FIXED_VOCAB)
    c = model.module.config
    assert c.encoder_sparse_step == 0 and c.decoder_sparse_step == 0
    assert model.module.encoder_moe is None and model.module.decoder_moe is None
  c = build("t5_1_1_large.gin").module.config
  assert (c.emb_dim, c.mlp_dim, c.activations, c.logits_via_embedding) == (
      1024, 2816, ("gelu", "linear"), False)


def test_tiny_switch_and_t5_have_equal_flops_per_token():
  switch = abstract_params(build("switch_tiny.gin", FIXED_VOCAB))
  e, m, f = macro("NUM_EXPERTS"), macro("EMBED_DIM"), macro("MLP_DIM")
  dense = abstract_params(build("t5_tiny.gin", FIXED_VOCAB))
  assert (macro("EMBED_DIM"), macro("MLP_DIM")) == (m, f)

  def active(tree):
    """Parameters one token passes through: a top-1 MoE layer counts one expert."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      names = [getattr(k, "key", "") for k in path]
      n = int(np.prod(leaf.shape))
      if "router" in names:
        continue  # the router is the only extra compute (m·E per token)
      if "mlp" in names and leaf.ndim == 3:  # stacked expert weights [e, ...]
        n //= leaf.shape[0]
      total += n
    return total

  assert active(switch) == active(dense)
  # Two sparse layers (one per stack), each with E - 1 extra experts and a router.
  extra = 2 * ((e - 1) * 2 * m * f + m * e)
  assert models.count_params(switch) == models.count_params(dense) + extra


def test_tiny_vocab_follows_the_data_vocabulary():
  from moe_jax import data  # the embedded corpus vocabulary (trained once, then cached)
  for gin_file in ("switch_tiny.gin", "t5_tiny.gin", "gshard_tiny.gin"):
    model = build(gin_file)
    assert model.module.config.vocab_size == data.get_vocabulary().vocab_size


def test_command_line_bindings_override_files():
  model = build("switch_base.gin", ["NUM_EXPERTS = 16", "EMBED_DIM = 64",
                                    "models.T5Config.dropout_rate = 0.3"])
  assert model.module.config.emb_dim == 64 and model.module.config.dropout_rate == 0.3
  moe = model.module.encoder_moe
  assert moe.num_experts == 16 and moe.router.num_experts == 16


@pytest.mark.parametrize("binding,message", [
    ("NUM_EXPERTS = %UNDEFINED_MACRO", "macro %UNDEFINED_MACRO is used but never defined"),
    ("models.T5Config.no_such_field = 1", "no_such_field"),
    ("models.NoSuchThing.x = 1", "NoSuchThing"),
    ("EMBED_DIM = (", "EOF"),
])
def test_bad_bindings_give_one_line_errors(binding, message):
  with pytest.raises(ValueError, match="^gin: ") as info:
    config.parse_gin(["models/switch_base.gin"], [binding])
  assert message in str(info.value) and "\n" not in str(info.value)


def test_gin_files_found_by_any_name():
  paths = config.gin_search_paths()
  assert os.path.samefile(paths[0], os.path.join(os.path.dirname(__file__), os.pardir, "gin"))
  for name in ("gin/models/t5_tiny.gin", "models/t5_tiny.gin",
               os.path.join(GIN_DIR, "t5_tiny.gin")):
    assert os.path.samefile(config.resolve_gin_file(name, paths),
                            os.path.join(GIN_DIR, "t5_tiny.gin"))
  with pytest.raises(ValueError, match="not found"):
    config.parse_gin(["models/no_such_model.gin"])


def test_init_scale_scales_every_kernel_std_by_its_square_root():
  """INIT_SCALE = 0.1 (Switch Sec. 2.4): attention, dense MLP and expert kernels drawn with the
  same rng are sqrt(0.1) times the default ones; embeddings, router and relative position bias
  keep their own init."""
  tiny = FIXED_VOCAB + ["NUM_EXPERTS = 2", "EMBED_DIM = 8", "MLP_DIM = 16", "NUM_HEADS = 2",
                        "HEAD_DIM = 4", "LOGITS_VIA_EMBEDDING = False"]

  def params(scale):
    model = build("switch_tiny.gin", tiny + [f"INIT_SCALE = {scale}"])
    variables = model.get_initial_variables(jax.random.key(0), SHAPES)
    return flax.traverse_util.flatten_dict(flax.core.meta.unbox(variables["params"]), sep="/")

  default, small = params(1.0), params(0.1)
  scaled = [k for k in default if k.rsplit("/", 1)[-1] in
            ("query", "key", "value", "out", "wi", "wo", "logits_dense")]
  kinds = {k.rsplit("/", 1)[-1] + ("(expert)" if "/mlp/" in k and default[k].ndim == 3 else "")
           for k in scaled}
  assert {"query", "out", "wi", "wo", "wi(expert)", "wo(expert)", "logits_dense"} <= kinds
  for k in default:
    if k in scaled:
      assert np.std(small[k]) / np.std(default[k]) == pytest.approx(np.sqrt(0.1), rel=1e-5), k
    else:
      np.testing.assert_array_equal(small[k], default[k], err_msg=k)


def test_a_built_model_no_longer_reads_gin():
  """Two differently configured models live in one process, and clearing gin breaks neither:
  the MoE templates are built with the model, not when it is applied."""
  tiny = FIXED_VOCAB + ["NUM_EXPERTS = 4", "EMBED_DIM = 8", "MLP_DIM = 16", "NUM_HEADS = 2",
                        "HEAD_DIM = 4", "MIN_EXPERT_CAPACITY = 1", "ENCODER_SPARSE_STEP = 1",
                        "DECODER_SPARSE_STEP = 1"]
  rng = np.random.default_rng(0)
  batch = {"encoder_input_tokens": rng.integers(2, 2100, (2, 8)),
           "decoder_input_tokens": rng.integers(2, 2100, (2, 4)),
           "decoder_target_tokens": rng.integers(2, 2100, (2, 4))}

  def run(model, params):
    _, metrics = model.eval_fn(params, batch)
    return {k: np.asarray(v) for k, v in metrics.items()}

  roomy = config.build_model(["models/switch_tiny.gin"], tiny + ["EVAL_CAPACITY_FACTOR = 8.0"])
  params = roomy.get_initial_variables(jax.random.key(0), SHAPES)["params"]
  before = run(roomy, params)
  tight = config.build_model(["models/switch_tiny.gin"], tiny + ["EVAL_CAPACITY_FACTOR = 0.25"])
  drops = lambda m: [v for k, v in m.items() if k.endswith("fraction_dropped")]  # noqa: E731
  assert max(drops(run(tight, params))) > 0 and max(drops(before)) == 0
  after_tight = run(roomy, params)
  gin.clear_config()
  after_clear = run(roomy, params)
  for after in (after_tight, after_clear):
    assert before.keys() == after.keys()
    for k in before:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
