"""Routers against NumPy loop references, property tests and the seed's worked example."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, routing
import numpy_moe as ref


def route(router, logits, capacity, *, valid=None, deterministic=True, seed=0):
  """Route given logits directly (no router weights involved)."""
  logits = jnp.asarray(logits, jnp.float32)
  valid = jnp.ones(logits.shape[:2], bool) if valid is None else jnp.asarray(valid)
  fn = lambda lg, v, key: router.apply({}, lg, v, capacity, deterministic,  # noqa: E731
                                       method=router.route, rngs={"router": key})
  return jax.jit(fn)(logits, valid, jax.random.key(seed))


def tensors(router, decision, capacity):
  d, c = dispatch.dispatch_and_combine(decision, router.num_experts, capacity)
  return np.asarray(d), np.asarray(c)


# ---- capacity -----------------------------------------------------------------------------

def test_capacity_seed_example():
  assert routing.expert_capacity(8, 4, 1.0, num_selected_experts=2) == 4


@pytest.mark.parametrize("s,e,cf,k,mode,multiple,min_cap,expected", [
    (1024, 8, 1.25, 1, "ceil", 1, 4, 160),         # Switch: ceil(1.25 · 1024 / 8)
    (1024, 8, 1.0, 2, "ceil", 1, 4, 256),          # GShard paper 2S/E
    (100, 11, 1.1, 1, "ceil", 1, 1, 10),           # no slot from float noise
    (1000, 8, 1.25, 2, "flaxformer", 1, 4, 156),   # round(1.25·1000/8) = round(156.25), no ×k
    (10, 4, 1.0, 1, "flaxformer", 1, 1, 2),        # round(2.5) -> 2 (banker's rounding, as Python)
    (1000, 8, 1.25, 1, "mesh_tf", 1, 4, 156),      # int(156.25)
    (4, 2, 4.0, 1, "mesh_tf", 1, 1, 4),            # min(S, ...)
    (100, 8, 1.0, 1, "ceil", 4, 1, 16),            # Praxis: ceil(12.5)=13 -> multiple of 4
    (16, 64, 1.0, 1, "ceil", 1, 4, 4),             # min capacity
])
def test_capacity_variants(s, e, cf, k, mode, multiple, min_cap, expected):
  assert routing.expert_capacity(s, e, cf, num_selected_experts=k, min_capacity=min_cap,
                                 mode=mode, multiple_of=multiple) == expected


def test_capacity_bad_mode():
  with pytest.raises(ValueError, match="capacity mode='switch'"):
    routing.expert_capacity(8, 4, 1.0, mode="switch")


# ---- the seed's worked example --------------------------------------------------------------

def test_seed_worked_example_top2():
  """8 tokens, 4 experts, top-2, capacity 4. (first, second) choices per token; expert 0 is
  wanted first by five tokens, so token 4's first choice overflows and token 5's second choice
  finds expert 0 full."""
  choices = [(0, 1), (0, 2), (0, 3), (0, 1), (0, 2), (1, 0), (1, 2), (2, 3)]
  probs = np.full((1, 8, 4), 0.1)
  for t, (a, b) in enumerate(choices):
    probs[0, t, a], probs[0, t, b] = 0.5, 0.3
  router = routing.TokensChooseRouter(num_experts=4, num_selected_experts=2)
  capacity = routing.expert_capacity(8, 4, 1.0, num_selected_experts=2)
  d, c = tensors(router, route(router, np.log(probs), capacity), capacity)
  # token -> {expert: slot} that must hold; everything else empty.
  table = {0: {0: 0, 1: 2}, 1: {0: 1, 2: 1}, 2: {0: 2, 3: 0}, 3: {0: 3, 1: 3},
           4: {2: 2},            # first choice (expert 0) overflowed
           5: {1: 0},            # second choice (expert 0) full
           6: {1: 1, 2: 3}, 7: {2: 0, 3: 1}}
  expected = np.zeros((8, 4, 4))
  for t, placed in table.items():
    for e, slot in placed.items():
      expected[t, e, slot] = 1
  np.testing.assert_array_equal(d[0], expected)
  # Combine weight = raw probability of the kept assignment (no normalization by default).
  for t, placed in table.items():
    for e, slot in placed.items():
      assert c[0, t, e, slot] == pytest.approx(probs[0, t, e] / probs[0, t].sum(), rel=1e-6)
  np.testing.assert_array_equal(c[0] > 0, expected > 0)


# ---- against the NumPy loop reference -------------------------------------------------------

@pytest.mark.parametrize("k,normalize,before_drop,bpr", [
    (1, False, True, False), (1, False, True, True), (2, False, True, False),
    (2, True, True, False), (2, True, False, False), (2, True, True, True),
    (3, False, True, False), (3, True, False, True)])
def test_tokens_choose_matches_reference(k, normalize, before_drop, bpr):
  rng = np.random.default_rng(k * 10 + normalize * 3 + before_drop + bpr * 7)
  logits = rng.normal(size=(3, 12, 6)) * 2
  valid = rng.random((3, 12)) > 0.2
  capacity = 3
  router = routing.TokensChooseRouter(num_experts=6, num_selected_experts=k,
                                      normalize_gates=normalize, normalize_before_drop=before_drop,
                                      batch_prioritized=bpr)
  decision = route(router, logits, capacity, valid=valid)
  d, c = tensors(router, decision, capacity)
  rd, rc = ref.tokens_choose(logits, k, capacity, normalize=normalize, before_drop=before_drop,
                             batch_prioritized=bpr, valid=valid)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_allclose(c, rc, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(decision.load_balance_loss, ref.load_balance_loss(logits, valid),
                             rtol=1e-5)


@pytest.mark.parametrize("choices", ["first", "all"])
@pytest.mark.parametrize("loss_tokens", ["real", "all"])
def test_loss_options_match_reference(choices, loss_tokens):
  """load_balance_choices and loss_tokens against the NumPy loops (one group all padding)."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 10, 5)) * 2
  valid = rng.random((3, 10)) > 0.3
  valid[2] = False
  router = routing.TokensChooseRouter(num_experts=5, num_selected_experts=2,
                                      load_balance_choices=choices, loss_tokens=loss_tokens)
  decision = route(router, logits, 2, valid=valid)
  everything = loss_tokens == "all"
  np.testing.assert_allclose(
      decision.load_balance_loss,
      ref.load_balance_loss(logits, valid, k=2 if choices == "all" else 1, all_tokens=everything),
      rtol=1e-5)
  np.testing.assert_allclose(decision.router_z_loss,
                             ref.router_z_loss(logits, valid, all_tokens=everything), rtol=1e-5)


def test_loss_options_are_checked():
  with pytest.raises(ValueError, match="load_balance_choices"):
    routing.TokensChooseRouter(num_experts=4, load_balance_choices="some")
  with pytest.raises(ValueError, match="loss_tokens"):
    routing.ExpertsChooseRouter(num_experts=4, loss_tokens="padding")


def test_experts_choose_matches_reference():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 10, 4))
  valid = rng.random((2, 10)) > 0.3
  router = routing.ExpertsChooseRouter(num_experts=4)
  decision = route(router, logits, 3, valid=valid)
  d, c = tensors(router, decision, 3)
  rd, rc = ref.experts_choose(logits, 3, valid)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_allclose(c, rc, rtol=1e-5)
  assert float(decision.load_balance_loss) == 0.0
  # A token may get 0..E experts.
  per_token = d.sum((2, 3))
  assert per_token.min() == 0 and per_token.max() >= 2


def test_switch_combine_is_raw_probability():
  logits = np.random.default_rng(0).normal(size=(1, 6, 3))
  router = routing.TokensChooseRouter(num_experts=3)
  d, c = tensors(router, route(router, logits, 6), 6)
  np.testing.assert_allclose(c.sum((2, 3)), ref.softmax(logits).max(-1), rtol=1e-6)


# ---- second-expert policies -----------------------------------------------------------------

def _top2(policy, threshold=0.5, normalize=True):
  return routing.TokensChooseRouter(num_experts=8, num_selected_experts=2,
                                    second_expert_policy=policy, normalize_gates=normalize,
                                    second_expert_threshold=threshold)


def test_random_policy_extremes_and_rate():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 256, 8))
  big = 1000
  always = route(_top2("random", threshold=1e-9), logits, big, deterministic=False)
  allp = route(_top2("all"), logits, big, deterministic=False)
  np.testing.assert_array_equal(always.kept, allp.kept)
  never = route(_top2("random", threshold=1e9), logits, big, deterministic=False)
  nonep = route(_top2("none"), logits, big, deterministic=False)
  np.testing.assert_array_equal(never.kept, nonep.kept)
  assert not np.asarray(nonep.kept[..., 1]).any() and np.asarray(nonep.kept[..., 0]).all()
  # GShard's 2·p2 rule: P(keep second) = min(1, g2 / 0.5) with normalized gates.
  p = ref.softmax(logits)
  top = np.sort(p, -1)[..., ::-1][..., :2]
  g2 = top[..., 1] / top.sum(-1)
  expected = np.minimum(1.0, g2 / 0.5).mean()
  got = np.mean([np.asarray(route(_top2("random"), logits, big, deterministic=False, seed=s)
                            .kept[..., 1]).mean() for s in range(4)])
  assert got == pytest.approx(expected, abs=0.02)
  # Evaluation is deterministic ('all' by default).
  ev = route(_top2("random"), logits, big, deterministic=True)
  np.testing.assert_array_equal(ev.kept, allp.kept)


def test_sampling_policy_draws_from_router_distribution():
  logits = np.log(np.array([[[0.5, 0.3, 0.15, 0.05]]] * 1)).repeat(4000, axis=1)
  router = routing.TokensChooseRouter(num_experts=4, num_selected_experts=2,
                                      second_expert_policy="sampling")
  decision = route(router, logits, 10_000, deterministic=False)
  idx = np.asarray(decision.expert_index)
  assert (idx[..., 0] == 0).all() and (idx[..., 1] != 0).all()
  freq = np.bincount(idx[0, :, 1], minlength=4)[1:] / idx.shape[1]
  np.testing.assert_allclose(freq, np.array([0.3, 0.15, 0.05]) / 0.5, atol=0.03)


def test_router_errors():
  with pytest.raises(ValueError, match="second_expert_policy='best'"):
    routing.TokensChooseRouter(num_experts=4, second_expert_policy="best")
  with pytest.raises(ValueError, match="num_selected_experts=5"):
    routing.TokensChooseRouter(num_experts=4, num_selected_experts=5)
  with pytest.raises(ValueError, match="exceeds the group size"):
    route(routing.ExpertsChooseRouter(num_experts=2), np.zeros((1, 4, 2)), 5)


# ---- invariants over random shapes ----------------------------------------------------------

@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(g=st.integers(1, 3), s=st.integers(1, 12), e=st.integers(1, 6),
                  k=st.integers(1, 3), cf=st.floats(0.25, 3.0), seed=st.integers(0, 2**16),
                  bpr=st.booleans(), normalize=st.booleans())
def test_tokens_choose_invariants(g, s, e, k, cf, seed, bpr, normalize):
  k = min(k, e)
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(g, s, e)) * 3
  capacity = routing.expert_capacity(s, e, cf, num_selected_experts=k)
  router = routing.TokensChooseRouter(num_experts=e, num_selected_experts=k,
                                      batch_prioritized=bpr, normalize_gates=normalize)
  decision = route(router, logits, capacity)
  d, c = tensors(router, decision, capacity)
  assert d.sum(1).max(initial=0) <= 1              # every slot at most one token
  assert (d.sum((1, 3)) <= capacity).all()          # every expert at most C tokens
  assert (d.sum((2, 3)) <= k).all()                 # every token at most k experts
  # Combine weights = gates on kept assignments, 0 elsewhere.
  assert (c[d == 0] == 0).all()
  idx, kept, gate = map(np.asarray, (decision.expert_index, decision.kept, decision.gate))
  probs = ref.softmax(logits)
  for gi in range(g):
    for si in range(s):
      for j in range(k):
        if kept[gi, si, j]:
          assert c[gi, si, idx[gi, si, j]].sum() == pytest.approx(gate[gi, si, j], rel=1e-5)
          if not normalize:
            assert gate[gi, si, j] == pytest.approx(probs[gi, si, idx[gi, si, j]], rel=1e-5)
  # First choices are never displaced by second choices: a dropped first choice means its
  # expert is filled with first choices only.
  for gi in range(g):
    for si in range(s):
      if not kept[gi, si, 0]:
        ex = idx[gi, si, 0]
        holders = [(t, j) for t in range(s) for j in range(k) if kept[gi, t, j] and idx[gi, t, j] == ex]
        assert len(holders) == capacity and all(j == 0 for _, j in holders)


@pytest.mark.parametrize("g,s,e", [(1, 1, 1), (2, 7, 3), (3, 12, 8)])
def test_load_balance_loss_is_one_for_uniform_router(g, s, e):
  router = routing.TokensChooseRouter(num_experts=e)
  decision = route(router, np.zeros((g, s, e)), 4)
  assert float(decision.load_balance_loss) == pytest.approx(1.0, rel=1e-6)


def test_collapsed_router_loss_is_num_experts_and_z_loss():
  logits = np.zeros((2, 8, 4))
  logits[..., 2] = 50.0  # everything to expert 2
  router = routing.TokensChooseRouter(num_experts=4)
  decision = route(router, logits, 8)
  assert float(decision.load_balance_loss) == pytest.approx(4.0, rel=1e-5)
  assert float(decision.router_z_loss) == pytest.approx(ref.router_z_loss(logits), rel=1e-6)
  m = decision.metrics
  np.testing.assert_allclose(m["expert_load"], [0, 0, 1, 0], atol=1e-6)
  assert float(m["router_confidence"]) == pytest.approx(1.0, abs=1e-6)
  assert float(m["router_entropy"]) == pytest.approx(0.0, abs=1e-6)
  assert float(m["fraction_dropped"]) == 0.0
  # With capacity 2 only 2 of 8 tokens per group find a slot.
  assert float(route(router, logits, 2).metrics["fraction_dropped"]) == pytest.approx(0.75)


# ---- router weights and jitter --------------------------------------------------------------

def test_router_init_scale_and_jitter():
  router = routing.TokensChooseRouter(num_experts=64, jitter_noise=0.1)
  x = jax.random.normal(jax.random.key(0), (2, 16, 512))
  params = router.init({"params": jax.random.key(1)}, x, capacity=4, deterministic=True)
  w = np.asarray(params["params"]["w"].unbox())
  assert w.dtype == np.float32
  assert w.std() == pytest.approx(np.sqrt(0.1 / 512), rel=0.05)  # Switch: 0.1 × default scale
  clean = np.einsum("gsm,me->gse", np.asarray(x, np.float64), w)
  ev = router.apply(params, x, deterministic=True, method=router.router_logits)
  np.testing.assert_allclose(ev, clean, rtol=1e-4, atol=1e-4)
  tr = router.apply(params, x, deterministic=False, method=router.router_logits,
                    rngs={"router": jax.random.key(2)})
  bound = 0.1 * np.einsum("gsm,me->gse", np.abs(np.asarray(x)), np.abs(w))
  assert not np.allclose(tr, clean, atol=1e-4)
  assert (np.abs(np.asarray(tr) - clean) <= bound + 1e-4).all()
  with pytest.raises(Exception, match="router"):  # training jitter needs its own rng stream
    router.apply(params, x, deterministic=False, method=router.router_logits)


def test_jitter_is_uniform_on_its_interval():
  """routing.jitter against U(1-ε, 1+ε)'s own moments and histogram; an odd element count
  exercises the split of 32-bit draws into two values."""
  eps, shape = 0.1, (3, 1001, 7)
  u = np.asarray(routing.jitter(jax.random.key(0), shape, eps))
  assert u.shape == shape and u.dtype == np.float32
  assert ((u > 1 - eps) & (u < 1 + eps)).all()
  flat = u.reshape(-1).astype(np.float64)
  n = flat.size
  assert abs(flat.mean() - 1.0) < 4 * eps / np.sqrt(3 * n)
  assert flat.var() == pytest.approx(eps ** 2 / 3, rel=0.03)
  counts = np.histogram(flat, bins=20, range=(1 - eps, 1 + eps))[0]
  assert (np.abs(counts - n / 20) < 5 * np.sqrt(n / 20)).all()
  assert len(np.unique(u)) > 10_000  # a fine grid, not a handful of levels
  # The two values cut from one draw are independent: no correlation between the halves.
  half = (n + 1) // 2
  first, second = flat[:n - half], flat[half:]
  assert abs(np.corrcoef(first, second)[0, 1]) < 4 / np.sqrt(first.size)
  np.testing.assert_array_equal(u, routing.jitter(jax.random.key(0), shape, eps))
  assert not np.array_equal(u, routing.jitter(jax.random.key(1), shape, eps))
