"""Router and MoE-layer invariants, fuzzed with hypothesis against the NumPy loop references.

For every router: capacity respected, no (expert, slot) shared, gates in [0, 1] and 0 where
not kept (training mode, random second-expert policies included); the layer's output equals
the brute-force mixture Σ gate · FFN_e(token) of tests/numpy_moe.py for kept tokens and is
exactly 0 for dropped and padding tokens; evaluation is deterministic (no rng dependence).

Profiles: MOE_JAX_FUZZ_PROFILE=ci (default, 200 examples per router and test, derandomized) or
thorough (2000 examples, random seeds).
"""
import functools
import os

import flax
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, moe_layer, routing
import numpy_moe as ref

hypothesis.settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile("thorough", max_examples=2000, deadline=None,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
PROFILE = hypothesis.settings.get_profile(os.environ.get("MOE_JAX_FUZZ_PROFILE", "ci"))

# name -> (router kwargs, reference kwargs); E is added per example.
ROUTERS = {
    "switch_top1": ({}, dict(k=1)),
    "gshard_top2": (dict(num_selected_experts=2, normalize_gates=True,
                         second_expert_policy="random"), dict(k=2, normalize=True)),
    "top2_normalized_after_drop": (dict(num_selected_experts=2, normalize_gates=True,
                                        normalize_before_drop=False,
                                        second_expert_policy="sampling"),
                                   dict(k=2, normalize=True, before_drop=False)),
    "top3": (dict(num_selected_experts=3), dict(k=3)),
    "batch_prioritized": (dict(num_selected_experts=2, batch_prioritized=True),
                          dict(k=2, batch_prioritized=True)),
    "expert_choice": (None, None),
}
# (batch, length, d_model, d_ff, experts, group size, capacity factor): a few fixed shapes, so
# each compiles once; hypothesis varies the data, weights, padding and rngs.
SHAPES = [(2, 8, 8, 16, 4, 8, 1.0), (1, 12, 4, 8, 3, 6, 0.5), (3, 4, 8, 8, 6, 12, 2.0)]


def make_router(name, num_experts):
  kwargs = ROUTERS[name][0]
  if kwargs is None:
    return routing.ExpertsChooseRouter(num_experts=num_experts)
  return routing.TokensChooseRouter(num_experts=num_experts, **kwargs)


@functools.lru_cache(maxsize=None)
def compiled(name, shape):
  """(layer, jitted init, jitted apply) of the MoE layer with router `name` at `shape`."""
  b, l, m, h, e, s, cf = shape
  layer = moe_layer.MoeLayer(num_experts=e, d_ff=h, router=make_router(name, e), group_size=s,
                             train_capacity_factor=cf, eval_capacity_factor=cf,
                             min_expert_capacity=1)
  init = jax.jit(lambda key, x: layer.init(key, x, deterministic=True))
  apply = jax.jit(lambda v, x, valid, key: layer.apply(
      v, x, valid, deterministic=True, rngs={"router": key, "dropout": key}))
  return layer, init, apply


@functools.lru_cache(maxsize=None)
def compiled_route(name, e, capacity):
  """Training-mode routing of given logits (random second-expert policies draw from key)."""
  router = make_router(name, e)
  return jax.jit(lambda logits, valid, key: router.apply(
      {}, logits, valid, capacity, False, method=router.route, rngs={"router": key}))


def _data(draw_seed, shape):
  b, l, m, *_ = shape
  rng = np.random.default_rng(draw_seed)
  x = rng.normal(size=(b, l, m)).astype(np.float32)
  valid = rng.random((b, l)) < 0.85
  return x, valid


@pytest.mark.parametrize("name", sorted(ROUTERS))
@PROFILE
@hypothesis.given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1))
def test_layer_output_is_the_brute_force_mixture(name, shape, seed):
  b, l, m, h, e, s, cf = shape
  layer, init, apply = compiled(name, shape)
  x, valid = _data(seed, shape)
  variables = init(jax.random.key(seed % 2**31), jnp.asarray(x))
  # Router weights scaled up so that routing is decisive, but not so far that float32
  # probabilities saturate to exact ties (1.0) that float64 would still order.
  params = jax.tree.map(np.asarray, flax.linen.unbox(variables["params"]))
  params["router"]["w"] = params["router"]["w"] * 5.0
  y = np.asarray(apply({"params": params}, x, valid, jax.random.key(1)))
  # Evaluation draws no random numbers: another rng gives the same output bit for bit.
  np.testing.assert_array_equal(np.asarray(apply({"params": params}, x, valid,
                                                 jax.random.key(2))), y)

  groups = x.reshape(-1, s, m).astype(np.float64)
  group_valid = valid.reshape(-1, s)
  logits = groups @ params["router"]["w"].astype(np.float64)
  capacity = routing.expert_capacity(s, e, cf, num_selected_experts=layer.router.capacity_k,
                                     min_capacity=1)
  reference = ROUTERS[name][1]
  if reference is None:
    _, combine = ref.experts_choose(logits, capacity, valid=group_valid)
  else:
    _, combine = ref.tokens_choose(logits, reference["k"], capacity, valid=group_valid,
                                   **{k: v for k, v in reference.items() if k != "k"})
  want = ref.moe_layer(groups, [params["wi"]], params["wo"], combine).reshape(b, l, m)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  routed = combine.reshape(b, l, -1).any(-1)
  assert (y[~routed] == 0).all()  # dropped and padding tokens: exactly 0


@pytest.mark.parametrize("name", sorted(ROUTERS))
@PROFILE
@hypothesis.given(shape=st.sampled_from([(8, 4, 2), (12, 3, 3), (16, 8, 5)]),
                  seed=st.integers(0, 2**32 - 1))
def test_training_routing_respects_capacity_slots_and_gate_bounds(name, shape, seed):
  s, e, capacity = shape
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, s, e)) * 3
  valid = rng.random((2, s)) < 0.85
  decision = compiled_route(name, e, capacity)(jnp.asarray(logits, jnp.float32),
                                                jnp.asarray(valid), jax.random.key(seed % 997))
  index, slot, gate, kept = map(np.asarray, (decision.expert_index, decision.slot,
                                             decision.gate, decision.kept))
  assert not kept[~valid].any()                            # padding is never routed
  assert ((gate >= 0) & (gate <= 1 + 1e-6)).all() and (gate[~kept] == 0).all()
  for g in range(2):
    pairs = [(index[g, t, j], slot[g, t, j]) for t, j in zip(*np.nonzero(kept[g]))]
    assert len(pairs) == len(set(pairs))                   # no slot shared
    assert all(0 <= c < capacity for _, c in pairs)        # slots within capacity
    per_expert = np.bincount([ex for ex, _ in pairs], minlength=e)
    assert (per_expert <= capacity).all()                  # capacity respected
    assert (gate[g].sum(-1) <= 1 + 1e-5).all()             # gates of distinct experts
  d, _ = dispatch.dispatch_and_combine(decision, e, capacity)
  assert np.asarray(d).sum(1).max(initial=0) <= 1          # the dispatch mask agrees
