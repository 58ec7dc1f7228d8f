"""gin/semantics presets: Mesh TensorFlow's Switch formulas restated in NumPy (cited by file
and line of mesh_tensorflow/transformer/moe.py and transformer.py at tensorflow/mesh@da907937),
each preset's knobs, and the knobs' own definitions (expert dropout broadcast, loss tokens)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config
from moe_jax import dispatch as dispatch_lib
from moe_jax import moe_layer

E, M, H = 4, 6, 8


def preset_model(preset, bindings=()):
  return config.build_model(["models/switch_tiny.gin", f"semantics/{preset}.gin"],
                            ["VOCAB_SIZE = 100", f"NUM_EXPERTS = {E}", f"EMBED_DIM = {M}",
                             f"MLP_DIM = {H}", "ROUTER_JITTER_NOISE = 0.0",
                             "MIN_EXPERT_CAPACITY = 1", *bindings])


def mesh_tf_switch_layer(x, w, wi, wo, capacity_factor, min_capacity):
  """Mesh TensorFlow's top-1 Switch layer on groups x [g,s,m], float64.

  moe.py:368-371  expert_capacity = max(min(S, int(S · cf / E)), moe_min_expert_capacity)
  moe.py:1208-11  raw_gates = softmax(gate_logits); top_1 -> expert_gate, expert_index
  moe.py:1225-34  loss = mean_{g,e}(mean_s(raw_gates) · mean_s(one_hot(index))) · E²
  moe.py:1275-83  position_in_expert = exclusive cumsum over s; kept iff position < capacity
  moe.py:1295-01  combine = expert_gate · kept · one_hot(index) · one_hot(position)
  """
  g, s, _ = x.shape
  e = w.shape[-1]
  capacity = max(min(s, int((s * capacity_factor) / e)), min_capacity)
  logits = x @ w
  raw = np.exp(logits - logits.max(-1, keepdims=True))
  raw /= raw.sum(-1, keepdims=True)
  index = raw.argmax(-1)
  gate = np.take_along_axis(raw, index[..., None], -1)[..., 0]
  mask = np.eye(e)[index]  # [g,s,e]
  loss = np.mean(raw.mean(1) * mask.mean(1)) * e * e
  position = (np.cumsum(mask, axis=1) - mask) * mask
  kept = (position.sum(-1) < capacity)
  y = np.zeros_like(x)
  for gi in range(g):
    for si in range(s):
      if kept[gi, si]:
        j = index[gi, si]
        y[gi, si] = gate[gi, si] * (np.maximum(x[gi, si] @ wi[j], 0.0) @ wo[j])
  return y, loss, capacity, kept


@pytest.mark.parametrize("cf", [1.0, 1.5])
def test_mesh_tf_preset_matches_mesh_tf_switch(cf):
  moe = preset_model("mesh_tf", [f"TRAIN_CAPACITY_FACTOR = {cf}", f"EVAL_CAPACITY_FACTOR = {cf}",
                                 "GROUP_SIZE = 10"]).module.encoder_moe
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, M)).astype(np.float32)  # 30 tokens: 3 groups of 10
  params = {"router": {"w": rng.normal(size=(M, E)).astype(np.float32)},
            "wi": rng.normal(size=(E, M, H)).astype(np.float32) / np.sqrt(M),
            "wo": rng.normal(size=(E, H, M)).astype(np.float32) / np.sqrt(H)}
  y, state = moe.apply({"params": params}, jnp.asarray(x), deterministic=True, mutable=["moe"])
  ref_y, ref_loss, capacity, kept = mesh_tf_switch_layer(
      x.astype(np.float64), params["router"]["w"].astype(np.float64),
      params["wi"].astype(np.float64), params["wo"].astype(np.float64), cf, 1)
  assert moe.expert_capacity(10, True) == capacity
  assert not kept.all()  # capacity binds
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["moe"]["load_balance_loss"][0], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(state["moe"]["fraction_dropped"][0], 1 - kept.mean(), atol=1e-7)


def test_sum_over_layers_adds_each_layers_loss():
  """transformer.py:1066 loss = add_n(context.losses); each MoE layer appends its own loss
  (moe.py:121), so the same coefficient weighs L layers L times."""
  model = preset_model("mesh_tf", ["ENCODER_SPARSE_STEP = 1", "DECODER_SPARSE_STEP = 1"])
  rng = np.random.default_rng(1)
  batch = {"encoder_input_tokens": rng.integers(2, 100, (2, 6)),
           "decoder_input_tokens": rng.integers(2, 100, (2, 5)),
           "decoder_target_tokens": rng.integers(2, 100, (2, 5))}
  params = model.get_initial_variables(jax.random.key(0), {k: v.shape for k, v in
                                                           batch.items()})["params"]
  _, metrics = model.eval_fn(params, batch)
  per_layer = [float(v) for k, v in metrics.items() if k.endswith("/load_balance_loss")]
  assert len(per_layer) == 4
  assert float(metrics["aux_loss"]) == pytest.approx(0.01 * sum(per_layer), rel=1e-6)


def test_presets_set_their_knobs():
  ff = preset_model("flaxformer").module.encoder_moe
  assert (ff.capacity_mode, ff.group_rule, ff.dropout_broadcast_tokens) == (
      "flaxformer", "flaxformer", True)
  assert (ff.router.load_balance_choices, ff.router.loss_tokens, ff.router.router_init_std) == (
      "all", "all", 0.02)
  hf = preset_model("hf_switch", ["EXPERT_CAPACITY = 3"])
  assert (hf.module.encoder_moe.group_rule, hf.module.encoder_moe.fixed_capacity,
          hf.aux_loss_layers) == ("sequence", 3, "sum")
  default = config.build_model(["models/switch_tiny.gin"], ["VOCAB_SIZE = 100"])
  moe = default.module.encoder_moe
  assert (moe.capacity_mode, moe.group_rule, moe.fixed_capacity, moe.dropout_broadcast_tokens,
          moe.router.load_balance_choices, moe.router.loss_tokens, moe.router.router_init_std,
          default.aux_loss_layers) == ("ceil", "ceil", None, False, "first", "real", None, "mean")


def test_flaxformer_group_rule_by_formula():
  """The smallest G >= max(T // group_size, E·R) dividing T with E·R | G (flaxformer's
  _num_groups), against a brute-force search."""
  def brute(t, size, multiple):
    return min(n for n in range(1, t + 1)
               if n >= max(t // size, multiple) and t % n == 0 and n % multiple == 0)
  for t, size, e, batch_parts, expert_parts in [(32, 8, 4, 1, 1), (96, 7, 4, 1, 1),
                                                (64, 64, 2, 8, 2), (120, 16, 3, 1, 1)]:
    multiple = e * max(1, batch_parts // expert_parts)
    g, s = moe_layer.group_shape(t, group_size=size, num_groups=None, rule="flaxformer",
                                 num_experts=e, batch_partitions=batch_parts,
                                 num_expert_partitions=expert_parts)
    assert (g, s) == (brute(t, size, multiple), t // brute(t, size, multiple))
  with pytest.raises(ValueError, match="no group count"):
    moe_layer.group_shape(30, group_size=8, num_groups=None, rule="flaxformer", num_experts=4)


@pytest.mark.parametrize("broadcast", [False, True])
def test_expert_dropout_broadcast_shares_one_mask_per_expert(broadcast):
  experts = dispatch_lib.Experts(wi=[], wo=jnp.zeros((3, 16, 2)), activations=[],
                                 dropout_rate=0.5, dropout_rng=jax.random.key(0),
                                 dropout_broadcast_tokens=broadcast)
  dropped = np.asarray(experts.dropout(jnp.ones((3, 4, 5, 16)))) == 0  # [e,g,c,h]
  same_for_all_tokens = (dropped == dropped[:, :1, :1]).all()
  assert same_for_all_tokens == broadcast
  assert 0.3 < dropped.mean() < 0.7
  rows = jnp.ones((7, 16))
  row_expert = jnp.asarray([0, 0, 1, 1, 1, 2, 2])
  r = np.asarray(experts.dropout(rows, row_expert)) == 0
  if broadcast:  # the dropless path applies the same per-expert masks
    np.testing.assert_array_equal(r, dropped[np.asarray(row_expert), 0, 0])
