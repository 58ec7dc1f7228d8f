"""Model FLOPs (moe_jax.flops, the numerator of MFU) against the matmuls the training step
really runs: every dot_general in the jaxpr of the loss's gradient, counted op by op, with the
expected capacity slots worked out here from the paper's formula."""
import math

import jax
import numpy as np
import pytest

from moe_jax import config, flops, models

BATCH, INPUTS, TARGETS = 4, 32, 16
# Tiny gins read the data's vocabulary size; counting FLOPs needs none in particular.
TINY = ["VOCAB_SIZE = 2100"]


def dot_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
  """2 · (output elements) · (contracted size) summed over the dot_generals of `jaxpr` and of
  every jaxpr nested in it (jit, custom_vjp, remat, cond branches: the largest; scan: times
  its length). A while loop has no static trip count: refused."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
      continue
    assert eqn.primitive.name != "while", "a loop with no static trip count"
    inner = [dot_flops(getattr(v, "jaxpr", v)) for v in eqn.params.values()
             if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
    if eqn.primitive.name == "cond":
      inner = [max(dot_flops(b.jaxpr) for b in eqn.params["branches"])]
    total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def step_dot_flops(model: models.EncoderDecoderModel) -> int:
  shapes = {"encoder_input_tokens": (BATCH, INPUTS), "decoder_input_tokens": (BATCH, TARGETS)}
  params = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  batch = {"encoder_input_tokens": np.ones((BATCH, INPUTS), np.int32),
           "decoder_input_tokens": np.ones((BATCH, TARGETS), np.int32),
           "decoder_target_tokens": np.ones((BATCH, TARGETS), np.int32)}
  grad = jax.grad(lambda p: model.loss_fn(p, batch, jax.random.key(1))[0])
  return dot_flops(jax.make_jaxpr(grad)(params).jaxpr)


@pytest.mark.parametrize("gin_file", ["t5_tiny.gin", "t5_1_1_base.gin"])
def test_dense_model_flops_are_the_matmuls_the_step_runs(gin_file):
  """T5 v1.0 (relu, tied logits) and v1.1 (gated-gelu: two input matrices, untied logits)."""
  model = config.build_model([f"models/{gin_file}"], TINY if "tiny" in gin_file else [])
  assert flops.train_step_flops(model, BATCH, INPUTS, TARGETS) == step_dot_flops(model)


def test_dense_model_flops_follow_six_per_parameter_plus_attention():
  """PaLM's rule: 6 FLOPs per weight per token, here per token of the stack the weight acts
  on, plus 12 · layers · length · inner per token for attention (3 x 2 matmuls)."""
  model = config.build_model(["models/t5_tiny.gin"], TINY)
  c = model.module.config
  d, inner, f, v = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim, c.vocab_size
  enc_weights = c.num_encoder_layers * (4 * d * inner + 2 * d * f)
  dec_weights = c.num_decoder_layers * (6 * d * inner + 2 * d * f) + d * v  # + tied logits
  cross_kv = c.num_decoder_layers * 2 * d * inner  # acts on encoder tokens
  per_sequence = (6 * (enc_weights + cross_kv) * INPUTS + 6 * dec_weights * TARGETS
                  + 12 * inner * (c.num_encoder_layers * INPUTS * INPUTS
                                  + c.num_decoder_layers * TARGETS * (TARGETS + INPUTS)))
  assert flops.train_step_flops(model, BATCH, INPUTS, TARGETS) == BATCH * per_sequence


@pytest.mark.parametrize("gin_file,k", [("switch_tiny.gin", 1), ("gshard_tiny.gin", 2)])
def test_moe_flops_count_active_experts_not_capacity_slots(gin_file, k):
  """The step runs every expert over its capacity slots (dispatch='indices': no dispatch
  einsums); the model FLOPs count k experts per token. The difference is the empty slots'
  expert matmuls, plus the routing metrics' small one-hot contractions."""
  model = config.build_model([f"models/{gin_file}"],
                             TINY + ["moe_layer.MoeLayer.dispatch = 'indices'"])
  moe = model.module.encoder_moe
  e, m, h = moe.num_experts, model.module.config.emb_dim, moe.d_ff
  assert moe.router.num_selected_experts == k
  slots = 0
  for tokens in (BATCH * INPUTS, BATCH * TARGETS):  # one MoE layer per stack, one group each
    assert tokens <= moe.group_size
    capacity = max(math.ceil(moe.train_capacity_factor * k * tokens / e), moe.min_expert_capacity)
    slots += e * capacity - k * tokens
  empty_slots = 3 * 2 * 2 * m * h * slots  # fwd+bwd of wi and wo over the empty slots
  model_flops = flops.train_step_flops(model, BATCH, INPUTS, TARGETS)
  residual = step_dot_flops(model) - model_flops - empty_slots
  assert 0 <= residual < 0.002 * model_flops, (residual, model_flops)
  dense = config.build_model(["models/t5_tiny.gin"], TINY)
  routers = 3 * 2 * m * e * BATCH * (INPUTS + TARGETS)
  expert_extra = 3 * (k - 1) * 2 * 2 * m * h * BATCH * (INPUTS + TARGETS)
  dense_flops = flops.train_step_flops(dense, BATCH, INPUTS, TARGETS)
  assert model_flops == dense_flops + routers + expert_extra


def test_switch_base_8_is_flop_matched_to_t5_base():
  """Switch Transformer, Table 1: Switch-Base is FLOP-matched to T5-Base; the only extra
  model FLOPs are the routers (m·E per token in every other layer of each stack)."""
  switch = config.build_model(["models/switch_base_8.gin"])
  t5 = config.build_model(["models/t5_base.gin"])
  batch, inputs, targets = 2, 512, 114
  routers = 3 * 2 * 768 * 8 * batch * 6 * (inputs + targets)
  assert (flops.train_step_flops(switch, batch, inputs, targets)
          == flops.train_step_flops(t5, batch, inputs, targets) + routers)
