"""MoeLayer against a token-by-token NumPy reference; dropping, gradients, dtypes, errors."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import moe_layer, routing
import numpy_moe as ref


def make_layer(router, **kw):
  kw = {"num_experts": router.num_experts, "d_ff": 16, "router": router, "group_size": 8,
        "min_expert_capacity": 1, **kw}
  return moe_layer.MoeLayer(**kw)


def run(layer, x, padding_mask=None, *, deterministic=True, seed=0):
  variables = layer.init({"params": jax.random.key(seed)}, x, padding_mask, deterministic=True)
  y, state = layer.apply(variables, x, padding_mask, deterministic=deterministic,
                         rngs={"router": jax.random.key(1), "dropout": jax.random.key(2)},
                         mutable=["moe"])
  params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
  return np.asarray(y), params, state["moe"]


def reference(layer, params, x, padding_mask, route_fn, k):
  """Group as docs/semantics.md states (G = ceil(T / group_size) groups of S = ceil(T / G) tokens,
  padding at the end; no mesh), capacity C = max(ceil(k · cf · S / E), min capacity), route
  with the NumPy router, run token loops."""
  b, l, m = x.shape
  g = math.ceil(b * l / layer.group_size)
  s = math.ceil(b * l / g)
  flat = np.zeros((g * s, m))
  flat[:b * l] = x.reshape(-1, m)
  valid = np.zeros(g * s, bool)
  valid[:b * l] = True if padding_mask is None else padding_mask.reshape(-1)
  groups, valid = flat.reshape(g, s, m), valid.reshape(g, s)
  logits = np.einsum("gsm,me->gse", groups, params["router"]["w"].astype(np.float64))
  capacity = max(math.ceil(k * layer.eval_capacity_factor * s / layer.num_experts),
                 layer.min_expert_capacity)
  _, combine = route_fn(logits, capacity, valid)
  names = ["wi"] if "wi" in params else ["wi_0", "wi_1"]
  y = ref.moe_layer(groups, [params[n] for n in names], params["wo"], combine, layer.activations)
  return y.reshape(-1, m)[:b * l].reshape(b, l, m), combine, logits, valid


CASES = {  # name: (router, NumPy routing, k in the capacity formula)
    "switch_top1": (routing.TokensChooseRouter(num_experts=4),
                    lambda lg, c, v: ref.tokens_choose(lg, 1, c, valid=v), 1),
    "gshard_top2": (routing.TokensChooseRouter(num_experts=4, num_selected_experts=2,
                                               normalize_gates=True),
                    lambda lg, c, v: ref.tokens_choose(lg, 2, c, normalize=True, valid=v), 2),
    "top3_bpr": (routing.TokensChooseRouter(num_experts=6, num_selected_experts=3,
                                            batch_prioritized=True),
                 lambda lg, c, v: ref.tokens_choose(lg, 3, c, batch_prioritized=True, valid=v), 3),
    "expert_choice": (routing.ExpertsChooseRouter(num_experts=4),
                      lambda lg, c, v: ref.experts_choose(lg, c, v), 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("activations", [("relu",), ("gelu", "linear")])
def test_layer_matches_numpy_reference(name, activations):
  router, route_fn, k = CASES[name]
  # 4·5 = 20 tokens in groups of at most 8 -> 3 groups of 7, the last with 1 padding slot;
  # cf 1 so capacity binds.
  layer = make_layer(router, activations=activations, eval_capacity_factor=1.0)
  x = np.random.default_rng(0).normal(size=(4, 5, 8)).astype(np.float32)
  mask = np.ones((4, 5), bool)
  mask[2, 3:] = False  # padded positions of a sequence are never routed
  y, params, moe = run(layer, jnp.asarray(x), jnp.asarray(mask))
  want, combine, logits, valid = reference(layer, params, x, mask, route_fn, k)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
  assert (np.abs(y[2, 3:]) == 0).all()
  if isinstance(router, routing.TokensChooseRouter):
    assert float(moe["load_balance_loss"][0]) == pytest.approx(
        ref.load_balance_loss(logits, valid), rel=1e-4)
  real = valid.sum()
  routed = (combine.sum((2, 3)) > 0) & valid
  assert float(moe["fraction_dropped"][0]) == pytest.approx(1 - routed.sum() / real, abs=1e-6)


def test_dropped_tokens_output_zero_and_get_no_gradient():
  # Every token prefers expert 0: only `capacity` tokens per group find a slot.
  router = routing.TokensChooseRouter(num_experts=4)
  layer = make_layer(router, eval_capacity_factor=0.5)  # C = ceil(0.5·8/4) = 1
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8)), jnp.float32)
  variables = layer.init({"params": jax.random.key(0)}, x, deterministic=True)
  w = np.zeros((8, 4), np.float32)
  w[:, 0] = 1.0
  params = nn.unbox(variables["params"])
  params["router"]["w"] = jnp.asarray(w)
  x = jnp.abs(x)  # positive inputs -> logits favour expert 0 for every token
  y = layer.apply({"params": params}, x, deterministic=True)
  kept = np.abs(np.asarray(y)).sum(-1) > 0
  assert kept.sum() == 2  # one token per group of 8
  dropped = ~kept

  def loss_on_dropped(p, x):
    out = layer.apply({"params": p}, x, deterministic=True)
    return jnp.sum(out * jnp.asarray(dropped)[..., None])

  gp, gx = jax.grad(loss_on_dropped, argnums=(0, 1))(params, x)
  for leaf in jax.tree.leaves(gp):
    assert np.abs(np.asarray(leaf)).max() == 0.0
  assert np.abs(np.asarray(gx)).max() == 0.0


def test_gradients_reach_router_and_experts():
  router = routing.TokensChooseRouter(num_experts=4, num_selected_experts=2, jitter_noise=0.01)
  layer = make_layer(router, train_capacity_factor=2.0, dropout_rate=0.1,
                     activations=("gelu", "linear"))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8)), jnp.float32)
  params = nn.unbox(layer.init({"params": jax.random.key(0)}, x, deterministic=True)["params"])

  def loss(p):
    y, st = layer.apply({"params": p}, x, deterministic=False, mutable=["moe"],
                        rngs={"router": jax.random.key(1), "dropout": jax.random.key(2)})
    losses, _ = moe_layer.summarize(st["moe"])
    return jnp.mean(y ** 2) + 0.01 * losses["load_balance_loss"]

  grads = jax.grad(loss)(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    leaf = np.asarray(leaf)
    assert np.isfinite(leaf).all(), path
    assert np.abs(leaf).max() > 0, path


@pytest.mark.parametrize("k", [1, 2])
def test_unbounded_capacity_equals_dense_mixture(k):
  """With C >= S nothing drops: every token goes through its top-k experts, brute force."""
  router = routing.TokensChooseRouter(num_experts=4, num_selected_experts=k)
  layer = make_layer(router, eval_capacity_factor=4.0 / k)  # C = S
  x = np.random.default_rng(3).normal(size=(2, 8, 8)).astype(np.float32)
  y, p, _ = run(layer, jnp.asarray(x))
  want = np.zeros_like(x, np.float64)
  for b in range(2):
    for t in range(8):
      probs = ref.softmax(x[b, t] @ p["router"]["w"])
      for e in np.argsort(-probs)[:k]:
        want[b, t] += probs[e] * np.maximum(x[b, t] @ p["wi"][e], 0) @ p["wo"][e]
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)


def test_dtype_policy_and_annotations():
  router = routing.TokensChooseRouter(num_experts=4)
  layer = make_layer(router, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8), jnp.bfloat16)
  variables = layer.init({"params": jax.random.key(0)}, x, deterministic=True)
  boxed = variables["params"]
  assert boxed["router"]["w"].names == ("embed", "unmodeled")
  assert boxed["wi"].names == ("expert", "embed", "expert_mlp")
  assert boxed["wo"].names == ("expert", "expert_mlp", "embed")
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.unbox(boxed)))
  logits = router.apply({"params": nn.unbox(boxed)["router"]}, x.reshape(2, 8, 8),
                        deterministic=True, method=router.router_logits)
  assert logits.dtype == jnp.float32
  y = layer.apply(variables, x, deterministic=True)
  assert y.dtype == jnp.bfloat16
  jaxpr = str(jax.make_jaxpr(lambda v: layer.apply(v, x, deterministic=True))(variables))
  assert "bf16[4,2,4,16]" in jaxpr  # expert hidden [e,g,c,h] (C = 2·8/4) in bfloat16


def test_group_shape():
  assert moe_layer.group_shape(4096, group_size=1024, num_groups=None) == (4, 1024)
  assert moe_layer.group_shape(1000, group_size=256, num_groups=None) == (4, 250)
  assert moe_layer.group_shape(100, group_size=64, num_groups=None, num_expert_partitions=4) == (4, 25)
  assert moe_layer.group_shape(10, group_size=None, num_groups=4, num_expert_partitions=2) == (4, 3)
  # Groups fill every batch partition (data x expert), also when fewer would reach group_size.
  assert moe_layer.group_shape(4096, group_size=1024, num_groups=None, num_expert_partitions=2,
                               batch_partitions=8) == (8, 512)
  assert moe_layer.group_shape(4096, group_size=256, num_groups=None, num_expert_partitions=4,
                               batch_partitions=6) == (24, 171)
  with pytest.raises(ValueError, match="num_groups=3 must be a multiple of num_expert_partitions=2"):
    moe_layer.group_shape(10, group_size=None, num_groups=3, num_expert_partitions=2)


def test_configuration_errors():
  tc = routing.TokensChooseRouter(num_experts=4, batch_prioritized=True)
  with pytest.raises(ValueError, match="batch_prioritized routing leaks future tokens"):
    make_layer(tc, causal=True)
  with pytest.raises(ValueError, match="ExpertsChooseRouter leaks future tokens"):
    make_layer(routing.ExpertsChooseRouter(num_experts=4), causal=True)
  make_layer(routing.TokensChooseRouter(num_experts=4), causal=True)  # fine in a decoder
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by num_expert_partitions=4"):
    make_layer(routing.TokensChooseRouter(num_experts=6), num_expert_partitions=4)
  with pytest.raises(ValueError, match="router num_experts=4 != MoeLayer num_experts=8"):
    make_layer(routing.TokensChooseRouter(num_experts=4), num_experts=8)
  with pytest.raises(ValueError, match="activations=.*unknown \\['swish'\\]"):
    make_layer(routing.TokensChooseRouter(num_experts=4), activations=("swish",))
  with pytest.raises(ValueError, match="dispatch=.scatter. is not .auto. or one of"):
    make_layer(routing.TokensChooseRouter(num_experts=4), dispatch="scatter")
  with pytest.raises(ValueError, match="grouped_matmul='cuda' is not None or one of"):
    make_layer(routing.TokensChooseRouter(num_experts=4), dispatch="dropless",
               grouped_matmul="cuda")


def test_summarize_averages_over_layers():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = x + make_layer(routing.TokensChooseRouter(num_experts=4), name=f"moe_{i}")(
            x, deterministic=True)
      return x

  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8)), jnp.float32)
  variables = Two().init(jax.random.key(0), x)
  _, state = Two().apply(variables, x, mutable=["moe"])
  losses, metrics = moe_layer.summarize(state["moe"])
  per_layer = [float(metrics[f"moe_{i}/load_balance_loss"]) for i in range(2)]
  assert float(losses["load_balance_loss"]) == pytest.approx(np.mean(per_layer), rel=1e-6)
  assert metrics["moe_0/expert_load"].shape == (4,)
  empty, _ = moe_layer.summarize({})
  assert float(empty["load_balance_loss"]) == 0.0
