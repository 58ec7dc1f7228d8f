"""Dispatch strategies: einsum == indices (outputs and gradients) for every router; with
capacity not binding all three agree; dropless drops nothing and equals a NumPy reference
(values, and gradients by finite differences of the reference); every grouped-matmul backend
equals a NumPy loop; refused combinations. (Dropless under a mesh: tests/test_partitioning.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch as dispatch_lib
from moe_jax import moe_layer, routing
import numpy_moe as ref

ROUTERS = {
    "top1": lambda: routing.TokensChooseRouter(num_experts=4),
    "top2_random": lambda: routing.TokensChooseRouter(
        num_experts=4, num_selected_experts=2, second_expert_policy="random",
        normalize_gates=True),
    "top2_after_drop": lambda: routing.TokensChooseRouter(
        num_experts=4, num_selected_experts=2, normalize_gates=True, normalize_before_drop=False),
    "top2_bpr": lambda: routing.TokensChooseRouter(
        num_experts=4, num_selected_experts=2, batch_prioritized=True),
    "expert_choice": lambda: routing.ExpertsChooseRouter(num_experts=4),
}


def layer_fn(router, dispatch, **kw):
  kw = {"group_size": 8, "min_expert_capacity": 1, "train_capacity_factor": 0.75,
        "activations": ("gelu", "linear"), **kw}
  return moe_layer.MoeLayer(num_experts=4, d_ff=16, router=router, dispatch=dispatch, **kw)


def loss_and_grads(layer, params, x):
  def loss(p, x):
    y, st = layer.apply({"params": p}, x, deterministic=False, mutable=["moe"],
                        rngs={"router": jax.random.key(1), "dropout": jax.random.key(2)})
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_einsum_and_indices_identical(name):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 8)), jnp.float32)  # 18 tokens, pad
  einsum = layer_fn(ROUTERS[name](), "einsum")
  params = nn.unbox(einsum.init({"params": jax.random.key(0)}, x, deterministic=True)["params"])
  y1, g1 = loss_and_grads(einsum, params, x)
  y2, g2 = loss_and_grads(layer_fn(ROUTERS[name](), "indices"), params, x)
  assert np.abs(np.asarray(y1)).sum() > 0
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_all_strategies_agree_when_capacity_does_not_bind(k):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8)), jnp.float32)
  outs = []
  for dispatch in ("einsum", "indices", "dropless"):
    layer = layer_fn(routing.TokensChooseRouter(num_experts=4, num_selected_experts=k), dispatch,
                     train_capacity_factor=4.0 / k)  # C = S
    if not outs:
      params = nn.unbox(layer.init({"params": jax.random.key(0)}, x, deterministic=True)["params"])
    outs.append(loss_and_grads(layer, params, x))
  for y, grads in outs[1:]:
    np.testing.assert_allclose(y, outs[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropless_drops_nothing_under_extreme_imbalance():
  x = jnp.abs(jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 8)), jnp.float32))
  layer = layer_fn(routing.TokensChooseRouter(num_experts=4, num_selected_experts=2), "dropless",
                   activations=("relu",))
  params = nn.unbox(layer.init({"params": jax.random.key(0)}, x, deterministic=True)["params"])
  w = np.zeros((8, 4), np.float32)
  w[:, 0], w[:, 1] = 2.0, 1.0  # every token: first choice expert 0, second expert 1
  params["router"]["w"] = jnp.asarray(w)
  y, state = layer.apply({"params": params}, x, deterministic=True, mutable=["moe"])
  assert float(state["moe"]["fraction_dropped"][0]) == 0.0
  xn = np.asarray(x, np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "router"}
  want = np.zeros_like(xn)
  for b in range(2):
    for t in range(16):
      probs = ref.softmax(xn[b, t] @ w)
      for e in (0, 1):
        want[b, t] += probs[e] * ref.ffn(xn[b, t], [p["wi"][e]], p["wo"][e])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  # The einsum strategy at cf 1 drops most of them.
  _, st = layer_fn(routing.TokensChooseRouter(num_experts=4, num_selected_experts=2), "einsum",
                   activations=("relu",), eval_capacity_factor=1.0).apply(
                       {"params": params}, x, deterministic=True, mutable=["moe"])
  assert float(st["moe"]["fraction_dropped"][0]) > 0.4


def test_refused_combinations():
  with pytest.raises(ValueError, match="dispatch='dropless' needs a tokens-choose router"):
    layer_fn(routing.ExpertsChooseRouter(num_experts=4), "dropless")


def test_auto_picks_a_strategy_with_the_same_semantics():
  on_cpu = layer_fn(routing.TokensChooseRouter(num_experts=4), "auto")
  assert jax.default_backend() == "cpu" and on_cpu.dispatch_strategy() == "indices"
  sharded = layer_fn(routing.TokensChooseRouter(num_experts=4), "auto", num_expert_partitions=2)
  assert sharded.dispatch_strategy() == "einsum"
  assert layer_fn(routing.TokensChooseRouter(num_experts=4), "dropless").dispatch_strategy() == "dropless"


def _numpy_dropless(x, router_w, wi, wo, k, activations):
  """Top-k MoE with nothing dropped, token by token: x [t,m] -> [t,m] (float64)."""
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    probs = ref.softmax(x[t] @ router_w)
    for e in np.argsort(-probs, kind="stable")[:k]:
      y[t] += probs[e] * ref.ffn(x[t], [w[e] for w in wi], wo[e], activations)
  return y


@pytest.mark.parametrize("grouped_matmul", [None, "ragged_dot"])
@pytest.mark.parametrize("k,activations", [(1, ("relu",)), (2, ("gelu", "linear"))])
def test_dropless_equals_numpy_reference_values_and_gradients(k, activations, grouped_matmul):
  """Outputs and the gradients of sum(y · c) w.r.t. every parameter and the input, against
  central differences of a float64 NumPy loop (no capacity, nothing dropped). Router weights
  are scaled up so routing is far from ties; one expert gets most tokens (uneven groups).
  grouped_matmul: the backend's default (windows on CPU) and the one a GPU picks."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 6))
  layer = layer_fn(routing.TokensChooseRouter(num_experts=4, num_selected_experts=k), "dropless",
                   activations=activations, grouped_matmul=grouped_matmul)
  params = nn.unbox(layer.init({"params": jax.random.key(0)}, jnp.asarray(x, jnp.float32),
                               deterministic=True)["params"])
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  params["router"]["w"] = rng.normal(size=(6, 4)) + np.array([1.5, 0, 0, 0])
  c = np.cos(np.arange(x.size)).reshape(x.shape)
  names = ["wi"] if len(activations) == 1 else ["wi_0", "wi_1"]

  def numpy_loss(p, x):
    y = _numpy_dropless(x.reshape(-1, 6), p["router"]["w"], [p[n] for n in names], p["wo"], k,
                        activations)
    return float(np.sum(y.reshape(x.shape) * c)), y.reshape(x.shape)

  def jax_loss(p, x):
    y = layer.apply({"params": p}, x, deterministic=True)
    return jnp.sum(y * c), y
  p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  (_, y), (gp, gx) = jax.value_and_grad(jax_loss, argnums=(0, 1), has_aux=True)(
      p32, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, numpy_loss(params, x)[1], rtol=1e-5, atol=1e-5)

  def finite_difference(get, put):
    base, out, eps = get(), np.zeros_like(get()), 1e-6
    for i in np.ndindex(base.shape):
      v = base.copy()
      v[i] += eps
      up = numpy_loss(*put(v))[0]
      v[i] -= 2 * eps
      out[i] = (up - numpy_loss(*put(v))[0]) / (2 * eps)
    return out
  np.testing.assert_allclose(gx, finite_difference(lambda: x, lambda v: (params, v)),
                             rtol=1e-4, atol=1e-4)
  for name in names + ["wo", "router"]:
    leaf = "w" if name == "router" else None

    def put(v, name=name, leaf=leaf):
      p = dict(params)
      p[name] = {leaf: v} if leaf else v
      return p, x
    got = gp[name][leaf] if leaf else gp[name]
    want = finite_difference(lambda: params[name][leaf] if leaf else params[name], put)
    assert np.abs(want).max() > 1e-3, name  # the gradient is not trivially 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("impl", dispatch_lib.GROUPED_IMPLS[:1] + dispatch_lib.GROUPED_IMPLS[2:])
def test_grouped_matmul_equals_numpy(impl):
  """Every backend (megablox in Pallas interpret mode) on groups of several sizes, one whose
  CPU window would run past the last row (moved back over its neighbour's rows), an empty
  group, and unused rows past the groups (-> 0)."""
  unit = dispatch_lib.ROW_UNIT
  sizes = [33 * unit, 0, unit, 10 * unit]
  n = sum(sizes) + unit
  rng = np.random.default_rng(4)
  x, w, dy = rng.normal(size=(n, 8)), rng.normal(size=(4, 8, 16)), rng.normal(size=(n, 16))
  want, want_dx, want_dw = np.zeros((n, 16)), np.zeros((n, 8)), np.zeros_like(w)
  start = 0
  for e, size in enumerate(sizes):
    for r in range(start, start + size):
      want[r] = x[r] @ w[e]
      want_dx[r] = w[e] @ dy[r]
      want_dw[e] += np.outer(x[r], dy[r])
    start += size

  def f(x, w):
    return dispatch_lib.grouped_matmul(x, w, jnp.asarray(sizes), impl)
  y, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(dy, jnp.float32))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-3)


def test_window_sizes_bound_the_padding():
  """Every group size up to the buffer gets a window that holds it, wasting at most
  WINDOW_RATIO - 1 of its rows plus two row units; windows are whole row units except the
  buffer itself."""
  unit, n = dispatch_lib.ROW_UNIT, 1000
  sizes = dispatch_lib.window_sizes(n)
  assert sizes[-1] == n and all(p % unit == 0 for p in sizes[:-1])
  for r in range(1, n + 1):
    p = min(q for q in sizes if q >= r)
    assert p - r <= (dispatch_lib.WINDOW_RATIO - 1) * r + 2 * unit, (r, p)


def test_grouped_matmul_refuses_unknown_impl():
  with pytest.raises(ValueError, match="impl='cuda' is not one of"):
    dispatch_lib.grouped_matmul(jnp.zeros((16, 2)), jnp.zeros((1, 2, 2)), jnp.array([16]), "cuda")
