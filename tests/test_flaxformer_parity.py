"""flaxformer parity: moe_jax's MoeLayer configured by gin/semantics/flaxformer.gin against the
real, unmodified flaxformer MoeLayer on identical weights: outputs, dispatch masks, dropped
tokens, load-balance and router z-losses, and gradients.

flaxformer is found through MOE_JAX_FLAXFORMER_DIR (the directory holding the `flaxformer`
package; .ci/run sets it); without it these tests are skipped.
"""
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config
from moe_jax import dispatch as dispatch_lib

FLAXFORMER_DIR = os.environ.get("MOE_JAX_FLAXFORMER_DIR", "")
if not os.path.isdir(os.path.join(FLAXFORMER_DIR, "flaxformer")):
  pytest.skip("flaxformer parity needs MOE_JAX_FLAXFORMER_DIR = a directory holding the "
              "flaxformer package (google/flaxformer; it runs with aqtp==0.9.0)",
              allow_module_level=True)
sys.path.insert(0, FLAXFORMER_DIR)
from flaxformer.architectures.moe import moe_layers as ff_moe  # noqa: E402
from flaxformer.architectures.moe import routing as ff_routing  # noqa: E402
from flaxformer.components import dense as ff_dense  # noqa: E402

E, M, H = 4, 6, 8  # experts, d_model, d_ff
B, L, GROUP = 4, 8, 8  # 32 tokens -> flaxformer's rule: 4 groups of 8 (a multiple of E)
CF = 1.0  # capacity round(1.0 · 8 / 4) = 2 slots per expert per group: binds


def flaxformer_layer(router_kind, k, bpr):
  weights = ff_routing.RouterWeights(use_bias=False, dtype=jnp.float32)
  common = dict(router_weights=weights, jitter_noise=0.0, ignore_padding_tokens=True,
                dtype=jnp.float32)
  if router_kind == "expert_choice":
    router = ff_routing.ExpertsChooseMaskedRouter(**common)
  else:
    cls = (ff_routing.TokensChooseMaskedRouter if router_kind == "masked"
           else ff_routing.TokensChooseScatterRouter)
    router = cls(num_selected_experts=k, batch_prioritized_routing=bpr, **common)
  expert = ff_dense.MlpBlock(use_bias=False, intermediate_dim=H, activations=("relu",),
                             intermediate_dropout_rate=0.0, final_dropout_rate=0.0,
                             dtype=jnp.float32)
  # One expert replica (flaxformer derives replicas from the device count): expert × model
  # partitions cover every device.
  return ff_moe.MoeLayer(
      num_experts=E, max_group_size=GROUP, train_capacity_factor=CF, eval_capacity_factor=CF,
      expert=expert, router=router, num_expert_partitions=E,
      num_model_partitions=jax.device_count() // E, min_expert_capacity=1, dropout_rate=0.0,
      dtype=jnp.float32)


def moe_jax_layer(router_kind, k, bpr):
  """The encoder MoE template of a tiny model under the flaxformer preset."""
  base = "models/expert_choice_tiny.gin" if router_kind == "expert_choice" else "models/switch_tiny.gin"
  bindings = [
      "VOCAB_SIZE = 100", f"NUM_EXPERTS = {E}", f"EMBED_DIM = {M}", f"MLP_DIM = {H}",
      f"GROUP_SIZE = {GROUP}", f"TRAIN_CAPACITY_FACTOR = {CF}", f"EVAL_CAPACITY_FACTOR = {CF}",
      "MIN_EXPERT_CAPACITY = 1", "ROUTER_JITTER_NOISE = 0.0", f"NUM_SELECTED_EXPERTS = {k}",
      f"routing.TokensChooseRouter.batch_prioritized = {bpr}",
      "encoder/moe_layer.MoeLayer.train_capacity_factor = 1.0",
      "encoder/moe_layer.MoeLayer.eval_capacity_factor = 1.0",
      "moe_layer.MoeLayer.dispatch = 'einsum'"]
  model = config.build_model([base, "semantics/flaxformer.gin"], bindings)
  return model.module.encoder_moe


def inputs(pad):
  x = np.array(jax.random.normal(jax.random.key(3), (B, L, M)), np.float32)
  valid = np.ones((B, L), bool)
  if pad:  # flaxformer recognizes padding as all-zero inputs (T5 zeroes them)
    valid[1, 5:] = valid[3, 2:] = False
    x[~valid] = 0.0
  return jnp.asarray(x), jnp.asarray(valid)


def convert(ff_params):
  return {"wi": ff_params["expert"]["wi"]["kernel"], "wo": ff_params["expert"]["wo"]["kernel"],
          "router": {"w": ff_params["router"]["router_weights"]["w"]["kernel"]}}


CASES = [("masked", 1, False, True), ("masked", 2, False, True), ("masked", 2, True, True),
         ("masked", 3, True, False), ("scatter", 1, False, False), ("scatter", 2, True, False),
         ("expert_choice", 1, False, True)]


@pytest.mark.parametrize("router_kind,k,bpr,pad", CASES)
def test_layer_matches_flaxformer(router_kind, k, bpr, pad):
  """Outputs, losses, drops and gradients. flaxformer's scatter router lets padding take
  capacity (moe_jax never routes padding), so its cases run without padding."""
  ff = flaxformer_layer(router_kind, k, bpr)
  ours = moe_jax_layer(router_kind, k, bpr)
  x, valid = inputs(pad)
  ff_params = flax.core.meta.unbox(
      ff.init({"params": jax.random.key(0)}, x, enable_dropout=False)["params"])
  params = convert(ff_params)

  def ff_fn(p, x):
    y, state = ff.apply({"params": p}, x, enable_dropout=False, mutable=["intermediates"])
    return y, {k: v[0].reshape(()) for k, v in state["intermediates"].items()}

  def our_fn(p, x):
    y, state = ours.apply({"params": p}, x, valid, deterministic=True, mutable=["moe"])
    return y, {k: v[0] for k, v in state["moe"].items()}

  y_ff, m_ff = ff_fn(ff_params, x)
  y, m = our_fn(params, x)
  if router_kind == "scatter":  # flaxformer sums the k gathered outputs in another order
    np.testing.assert_allclose(y, y_ff, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_array_equal(y, y_ff)
  ff_dropped = float(m_ff["fraction_tokens_left_behind"])
  if router_kind == "scatter":  # flaxformer's scatter metric counts each token k times
    ff_dropped = 1.0 - (1.0 - ff_dropped) * k
  assert float(m["fraction_dropped"]) == pytest.approx(ff_dropped, abs=1e-6)
  assert 0 < float(m["fraction_dropped"]) or router_kind == "expert_choice"
  # The same sums in another order: a few float32 ulps.
  np.testing.assert_allclose(m["load_balance_loss"], m_ff["auxiliary_loss"], rtol=1e-6)
  np.testing.assert_array_equal(m["router_z_loss"], m_ff["router_z_loss"])

  cotangent = jax.random.normal(jax.random.key(4), x.shape)
  def objective(fn, p, x):  # output and both losses, so their gradients are compared too
    y, metrics = fn(p, x)
    return jnp.sum(y * cotangent) + metrics["router_z_loss"] + (
        metrics.get("auxiliary_loss", metrics.get("load_balance_loss")))
  g_ff = jax.grad(lambda p, x: objective(ff_fn, p, x), argnums=(0, 1))(ff_params, x)
  g = jax.grad(lambda p, x: objective(our_fn, p, x), argnums=(0, 1))(params, x)
  g_ff = (convert(g_ff[0]), g_ff[1])
  flat, flat_ff = (flax.traverse_util.flatten_dict(t[0], sep="/") for t in (g, g_ff))
  assert flat.keys() == flat_ff.keys()
  for key in flat:
    np.testing.assert_allclose(flat[key], flat_ff[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(g[1], g_ff[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router_kind,k,bpr,pad", CASES)
def test_dispatch_matches_flaxformer(router_kind, k, bpr, pad):
  """Which token sits in which (expert, slot), and its combine weight, group by group."""
  ff = flaxformer_layer(router_kind, k, bpr)
  ours = moe_jax_layer(router_kind, k, bpr)
  x, valid = inputs(pad)
  groups, valid = x.reshape(B * L // GROUP, GROUP, M), valid.reshape(-1, GROUP)
  capacity = round(CF * GROUP / E)  # flaxformer's formula
  w = jax.random.normal(jax.random.key(5), (M, E)) * 0.5
  decision = ours.router.apply({"params": {"w": w}}, groups, capacity=capacity, valid=valid,
                               deterministic=True)
  dispatch, combine = dispatch_lib.dispatch_and_combine(decision, E, capacity)
  ff_out = ff.router.apply({"params": {"router_weights": {"w": {"kernel": w}}}}, groups, E,
                           capacity, apply_jitter=False)
  if router_kind == "scatter":
    # dispatch_indices [g,s,k,2] = (expert, slot); combine_weights [g,s,k], 0 where dropped.
    kept = np.asarray(ff_out.combine_weights) > 0
    np.testing.assert_array_equal(decision.kept, kept)
    np.testing.assert_array_equal(decision.expert_index, ff_out.dispatch_indices[..., 0])
    np.testing.assert_array_equal(np.where(kept, decision.slot, -1),
                                  np.where(kept, ff_out.dispatch_indices[..., 1], -1))
    np.testing.assert_allclose(decision.gate, ff_out.combine_weights, rtol=1e-7)
  else:
    real = np.asarray(valid)[..., None, None]  # flaxformer's expert choice may pick padding
    np.testing.assert_array_equal(dispatch * real, np.asarray(ff_out.dispatch_mask) * real)
    np.testing.assert_allclose(combine * real, np.asarray(ff_out.combine_array) * real,
                               rtol=1e-7)
  assert float(dispatch.sum()) < float(np.asarray(valid).sum()) * min(k, E) or (
      router_kind == "expert_choice")


def test_router_init_is_flaxformers_normal():
  """RouterWeights' kernel init is normal(0.02); the preset draws the same distribution."""
  ours = moe_jax_layer("masked", 1, False)
  w = ours.router.init(jax.random.key(0), jnp.ones((1, 4, 512)), capacity=1,
                       deterministic=True)["params"]["w"]
  w = np.asarray(flax.core.meta.unbox(w))
  ff_w = ff_routing.default_kernel_init(jax.random.key(1), (512, E))
  assert np.std(w) == pytest.approx(0.02, rel=0.1)
  assert np.std(w) == pytest.approx(float(np.std(ff_w)), rel=0.15)
