"""Partitioner: meshes, errors, shardings of params / optimizer state / batches, a sharded MoE
layer that matches the unsharded one exactly, its compiled collectives, the planner's figures
against real shards and compiled HLO, and a real two-process run."""
import functools
import json
import math
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import memory_planner, moe_layer, partitioning, routing

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import multihost_worker  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


def make(mesh_shape):
  n = math.prod(mesh_shape)
  return partitioning.Partitioner(mesh_shape=mesh_shape, devices=jax.devices()[:n])


class ToyMoeBlock(nn.Module):
  """A small real module that declares t5x logical axes on its params and activations."""
  experts: int = 8
  d_model: int = 32
  d_ff: int = 64
  vocab: int = 16

  @nn.compact
  def __call__(self, tokens):  # tokens [b,l] int
    init = nn.initializers.normal(0.1)
    emb = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                     (self.vocab, self.d_model))
    wi = self.param("wi", nn.with_logical_partitioning(init, ("expert", "embed", "expert_mlp")),
                    (self.experts, self.d_model, self.d_ff))
    wo = self.param("wo", nn.with_logical_partitioning(init, ("expert", "expert_mlp", "embed")),
                    (self.experts, self.d_ff, self.d_model))
    scale = self.param("scale", nn.initializers.ones, (self.d_model,))
    x = nn.with_logical_constraint(emb[tokens] * scale, ("batch", "length", "embed"))
    h = nn.relu(jnp.einsum("blm,emh->bleh", x, wi))
    y = jnp.einsum("bleh,ehm->blm", h, wo)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def toy_abstract():
  return jax.eval_shape(ToyMoeBlock().init, jax.random.key(0), jnp.zeros((8, 4), jnp.int32))


@functools.cache
def toy_params():
  """Unsharded params on one device (jitted: eager init compiles every op on its own)."""
  return nn.unbox(jax.jit(ToyMoeBlock().init)(jax.random.key(0),
                                             jnp.zeros((8, 4), jnp.int32)))["params"]


# ---- meshes and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", MESHES)
def test_mesh_shapes(shape):
  part = make(shape)
  assert part.mesh.axis_names == ("data", "expert", "model")
  assert tuple(part.mesh.devices.shape) == shape
  assert part.mesh_sizes == dict(zip(("data", "expert", "model"), shape))
  assert all(t == jax.sharding.AxisType.Auto for t in part.mesh.axis_types)


@pytest.mark.parametrize("experts,model,expected", [(1, 1, (8, 1, 1)), (4, 1, (2, 4, 1)),
                                                    (8, 1, (1, 8, 1)), (4, 2, (1, 4, 2)),
                                                    (2, 2, (2, 2, 2))])
def test_data_takes_the_rest(experts, model, expected):
  part = partitioning.Partitioner(num_expert_partitions=experts, num_model_partitions=model)
  assert tuple(part.mesh.devices.shape) == expected


def test_mesh_shape_forms_and_parse():
  assert partitioning.parse_mesh("data:32,expert:8,model:1") == (32, 8, 1)
  assert partitioning.parse_mesh("expert:8") == (1, 8, 1)
  for form in ((2, 4, 1), {"data": 2, "expert": 4}, "data:2,expert:4"):
    assert tuple(partitioning.Partitioner(mesh_shape=form).mesh.devices.shape) == (2, 4, 1)
  abstract = partitioning.Partitioner.abstract("data:256,expert:8")
  assert abstract.mesh_sizes == {"data": 256, "expert": 8, "model": 1}


@pytest.mark.parametrize("kwargs,match", [
    ({"num_expert_partitions": 3}, "num_expert_partitions=3 x num_model_partitions=1"),
    ({"num_expert_partitions": 4, "num_model_partitions": 4}, "num_model_partitions=4 = 16"),
    ({"num_model_partitions": 0}, "num_model_partitions=0"),
    ({"mesh_shape": (2, 2, 1)}, r"mesh_shape=\(2, 2, 1\) has 4 devices but 8"),
    ({"mesh_shape": (2, 4)}, "must be 3 positive sizes"),
    ({"mesh_shape": "data:2,experts:4"}, "expected 'data:N,expert:N,model:N'"),
    ({"mesh_shape": {"data": 2, "experts": 4}}, "unknown axes"),
])
def test_mesh_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    partitioning.Partitioner(**kwargs)


def test_validate_errors():
  part = make((2, 4, 1))
  part.validate(num_experts=8, batch_size=16, num_groups=4)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the 4 expert"):
    part.validate(num_experts=6)
  with pytest.raises(ValueError, match=r"batch_size=12 \(global\) is not divisible by the 8"):
    part.validate(batch_size=12)
  with pytest.raises(ValueError, match=r"num_groups=6 is not a multiple of the 4 expert"):
    part.validate(num_groups=6)


def test_param_not_divisible_names_the_param():
  part = make((1, 1, 8))  # vocab 16 and d_ff 64 split 8 ways are fine; make one that is not
  abstract = jax.eval_shape(ToyMoeBlock(vocab=12).init, jax.random.key(0),
                            jnp.zeros((8, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"\['params'\]\['embedding'\].*size 12.*\('model',\)"):
    part.params_shardings(abstract)


def test_batch_not_divisible():
  with pytest.raises(ValueError, match="global batch of 6 rows"):
    make((2, 4, 1)).shard_batch({"x": np.zeros((6, 3), np.int32)})


def test_abstract_partitioner_cannot_run():
  with pytest.raises(ValueError, match="can plan but not run"):
    partitioning.Partitioner.abstract((2, 4, 1)).jit(lambda x: x)


def test_initialize_multihost_arguments(monkeypatch):
  for name in ("MOE_JAX_COORDINATOR", "MOE_JAX_NUM_PROCESSES", "MOE_JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert partitioning.initialize_multihost() is False  # single process: nothing to start
  monkeypatch.setenv("MOE_JAX_COORDINATOR", "127.0.0.1:1234")
  with pytest.raises(ValueError, match="needs coordinator_address, num_processes and process_id"):
    partitioning.initialize_multihost()
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


# ---- shardings -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", MESHES)
def test_param_shardings(shape):
  specs = jax.tree.map(lambda s: s.spec, make(shape).params_shardings(toy_abstract()))
  # By hand from DEFAULT_RULES: expert -> 'expert', expert_mlp / vocab -> 'model', embed -> None.
  assert specs == {"params": {"embedding": P("model", None), "scale": P(),
                              "wi": P("expert", None, "model"), "wo": P("expert", "model", None)}}


def _find_factored(state):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "v_row"))
           if hasattr(s, "v_row")]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_adafactor_state_shardings(shape):
  part = make(shape)
  params = toy_abstract()["params"]
  # optax factors the two largest dims; v_row drops the largest, v_col the second largest:
  # wi [e=8, m=32, h=64] -> v_row [e,m], v_col [e,h]; wo [e, h=64, m=32] -> [e,m], [e,h].
  opt = optax.adafactor(1e-2, min_dim_size_to_factor=16)
  factored = _find_factored(part.opt_state_shardings(opt, params))
  spec = lambda tree: jax.tree.map(lambda s: s.spec, tree)  # noqa: E731
  assert spec(factored.v_row["wi"]) == P("expert", None)
  assert spec(factored.v_col["wi"]) == P("expert", "model")
  assert spec(factored.v_row["wo"]) == P("expert", None)
  assert spec(factored.v_col["wo"]) == P("expert", "model")
  assert spec(factored.v_row["embedding"]) == P("model")  # [vocab=16, m=32]: m reduced
  assert spec(factored.v_col["embedding"]) == P(None)
  assert spec(factored.count) == P()
  assert spec(factored.v["wi"]) == P()  # placeholder [1] when factored
  assert spec(factored.v["scale"]) == P(None)


def test_adafactor_equal_sizes_keep_expert():
  # wi [e=16, m=16, h=32]: v_col drops e or m (same shape [16, 32]); sharding stays on 'expert'.
  part = make((2, 4, 1))
  params = jax.eval_shape(ToyMoeBlock(experts=16, d_model=16, d_ff=32).init, jax.random.key(0),
                          jnp.zeros((8, 4), jnp.int32))["params"]
  opt = optax.adafactor(1e-2, min_dim_size_to_factor=8)
  factored = _find_factored(part.opt_state_shardings(opt, params))
  assert factored.v_col["wi"].spec == P("expert", "model")
  assert factored.v_row["wi"].spec == P("expert", None)


def test_adam_state_shardings_follow_params():
  part = make((2, 2, 2))
  params = toy_abstract()["params"]
  state = part.opt_state_shardings(optax.adamw(1e-3), params)
  mu = state[0].mu
  assert mu["wi"].spec == P("expert", None, "model")
  assert state[0].nu["embedding"].spec == P("model", None)
  assert state[0].count.spec == P()


def test_optimizer_step_with_derived_shardings_matches_unsharded():
  part = make((2, 2, 2))
  abstract = toy_abstract()["params"]
  opt = optax.adafactor(1e-2, min_dim_size_to_factor=16)
  p_sh = part.params_shardings(abstract)
  o_sh = part.opt_state_shardings(opt, abstract)
  host = toy_params()
  params = jax.device_put(host, p_sh)
  tokens = np.arange(32, dtype=np.int32).reshape(8, 4) % 16

  def step(p, s, t):
    grads = jax.grad(lambda q: jnp.sum(ToyMoeBlock().apply({"params": q}, t) ** 2))(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  state = part.jit(opt.init, in_shardings=(p_sh,), out_shardings=o_sh)(params)
  assert _find_factored(state).v_col["wi"].sharding.spec == P("expert", "model")
  sharded = part.jit(step, in_shardings=(p_sh, o_sh, part.data_sharding(2)),
                     out_shardings=(p_sh, o_sh))
  new_params, new_state = sharded(params, state, part.shard_batch(tokens))
  ref_params, ref_state = jax.jit(step)(host, opt.init(host), tokens)
  for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((ref_params,
                                                                             ref_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert new_params["wi"].sharding.spec == P("expert", None, "model")


def bytes_per_device(tree):
  """Largest number of bytes any one device holds of `tree`'s shards."""
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values())


def test_expert_weight_bytes_fall_with_expert_partitions():
  sizes = {}
  host = toy_params()
  for shape in [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1)]:
    part = make(shape)
    shardings = part.params_shardings(toy_abstract()["params"])
    params = jax.device_put(host, shardings)
    sizes[shape[1]] = bytes_per_device({"wi": params["wi"], "wo": params["wo"]})
    assert memory_planner.tree_bytes_per_device(params, shardings, part.mesh_sizes) == \
        bytes_per_device(params)
  full = 2 * 8 * 32 * 64 * 4
  assert sizes == {x: full // x for x in (1, 2, 4, 8)}


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_initialize_directly_sharded_equals_plain_init(shape):
  part = make(shape)
  tokens = jnp.zeros((8, 4), jnp.int32)
  variables = part.initialize(ToyMoeBlock().init, jax.random.key(3), tokens)
  plain = nn.unbox(ToyMoeBlock().init(jax.random.key(3), tokens))
  expected = part.params_shardings(toy_abstract())
  for got, want, sharding in zip(jax.tree.leaves(variables), jax.tree.leaves(plain),
                                 jax.tree.leaves(expected)):
    assert got.sharding.spec == sharding.spec
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)


def test_shard_batch_and_data_sharding():
  part = make((2, 4, 1))
  batch = {"inputs": np.arange(48, dtype=np.int32).reshape(8, 6),
           "weights": np.ones((8,), np.float32)}
  sharded = part.shard_batch(batch)
  assert sharded["inputs"].sharding.spec == P(("data", "expert"), None)
  assert sharded["weights"].sharding.spec == P(("data", "expert"))
  assert [s.data.shape for s in sharded["inputs"].addressable_shards] == [(1, 6)] * 8
  np.testing.assert_array_equal(np.asarray(sharded["inputs"]), batch["inputs"])


def test_jit_applies_logical_constraints_inside_modules():
  part = make((2, 4, 1))
  variables = part.initialize(ToyMoeBlock().init, jax.random.key(0), jnp.zeros((8, 4), jnp.int32))
  replicated = NamedSharding(part.mesh, P())
  tokens = jax.device_put(np.zeros((8, 4), np.int32), replicated)  # input not batch-sharded
  # No out_shardings: the output layout comes from the module's nn.with_logical_constraint.
  y = part.jit(ToyMoeBlock().apply)(variables, tokens)
  assert y.sharding.is_equivalent_to(NamedSharding(part.mesh, P(("data", "expert"))), 3)
  # Outside the partitioner's context the same constraint is a no-op.
  y_plain = jax.jit(ToyMoeBlock().apply)(variables, tokens)
  assert y_plain.sharding.is_fully_replicated


# ---- the real MoE layer, sharded -------------------------------------------------------------

ROUTERS = {
    "top1": lambda: routing.TokensChooseRouter(8),
    "top2": lambda: routing.TokensChooseRouter(8, num_selected_experts=2, normalize_gates=True),
    "expert_choice": lambda: routing.ExpertsChooseRouter(8),
}
B, L, M, H = 8, 8, 12, 16


def moe(router: str, expert_partitions: int, dispatch: str = "einsum"):
  # 8 groups of 8 tokens on every mesh, so all meshes compute the same function; capacity 1-2
  # slots so some tokens are dropped (dropless: none).
  return moe_layer.MoeLayer(num_experts=8, d_ff=H, router=ROUTERS[router](), num_groups=8,
                            group_size=None, num_expert_partitions=expert_partitions,
                            train_capacity_factor=1.0, min_expert_capacity=1,
                            dispatch=dispatch)


def layer_inputs():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(B, L, M)).astype(np.float32),
          rng.normal(size=(B, L, M)).astype(np.float32))


def layer_params(layer):
  """Random params in the layer's own tree ({'params': ...} unboxed; numpy: a jitted init would
  compile the whole forward pass just to draw them)."""
  x, _ = layer_inputs()
  abstract = jax.eval_shape(lambda: layer.init(jax.random.key(1), x, deterministic=True))
  rng = np.random.default_rng(1)
  return abstract, jax.tree.map(lambda a: rng.normal(scale=0.3, size=a.shape).astype(a.dtype),
                                nn.unbox(abstract["params"]))


def layer_loss(layer):
  def loss(params, x, r):
    y, state = layer.apply({"params": params}, x, deterministic=False, mutable=["moe"])
    losses, _ = moe_layer.summarize(state["moe"])
    return jnp.sum(y * r) + 0.01 * losses["load_balance_loss"] + losses["router_z_loss"], y
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _unsharded(routers, dispatch):
  x, r = layer_inputs()
  out = {}
  for router in routers:
    layer = moe(router, 1, dispatch)
    _, params = layer_params(layer)
    out[router] = (params, jax.jit(layer_loss(layer))(params, x, r))
  return out


@pytest.fixture(scope="module")
def unsharded_results():
  return _unsharded(ROUTERS, "einsum")


@pytest.fixture(scope="module")
def unsharded_dropless():
  return _unsharded(["top1", "top2"], "dropless")


def _check_sharded_matches(part, layer, reference):
  x, r = layer_inputs()
  params, ((ref_loss, ref_y), ref_grads) = reference
  abstract, _ = layer_params(layer)
  p_sh = part.params_shardings(abstract)["params"]
  params = jax.device_put(params, p_sh)
  data = part.shard_batch({"x": x, "r": r})
  fn = part.jit(layer_loss(layer), in_shardings=(p_sh, part.data_sharding(3),
                                                 part.data_sharding(3)))
  (loss, y), grads = fn(params, data["x"], data["r"])
  # Exact gradients: no ×num_expert_partitions rescale anywhere.
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert grads[0]["wi"].sharding.is_equivalent_to(p_sh["wi"], 3)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("router", list(ROUTERS))
def test_moe_layer_sharded_matches_unsharded(shape, router, unsharded_results):
  part = make(shape)
  _check_sharded_matches(part, moe(router, part.num_expert_partitions),
                         unsharded_results[router])


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("router", ["top1", "top2"])
def test_dropless_sharded_matches_unsharded(shape, router, unsharded_dropless):
  """Dropless runs per device (shard_map): experts over 'expert', hidden units over 'model'."""
  part = make(shape)
  _check_sharded_matches(part, moe(router, part.num_expert_partitions, "dropless"),
                         unsharded_dropless[router])


def _collective_shapes(hlo: str, op: str) -> list[list[tuple[int, ...]]]:
  """Result shapes (one list per instruction; tuples for variadic ones) of `op` in HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) " + re.escape(op) + r"\(", line)
    if m:
      out.append([tuple(int(d) for d in dims.split(",") if d)
                  for dims in re.findall(r"f32\[([\d,]*)\]", m.group(1))])
  return out


def _compiled(part, layer, train: bool):
  x, r = layer_inputs()
  abstract = jax.eval_shape(lambda: layer.init(jax.random.key(1), x, deterministic=True))
  p_sh = part.params_shardings(abstract)["params"]
  params = nn.unbox(abstract["params"])
  d_sh = part.data_sharding(3)
  if train:
    fn = part.jit(layer_loss(layer), in_shardings=(p_sh, d_sh, d_sh))
    return fn.lower(params, x, r).compile().as_text()
  def forward(p, x):
    return layer.apply({"params": p}, x, deterministic=False, mutable=["moe"])[0]
  fn = part.jit(forward, in_shardings=(p_sh, d_sh), out_shardings=d_sh)
  return fn.lower(params, x).compile().as_text()


def _geometry(layer, part):
  x, _ = layer_inputs()
  params = jax.eval_shape(lambda: layer.init(jax.random.key(1), x, deterministic=True))["params"]
  geometries = memory_planner.moe_geometries(
      lambda p, x: layer.apply({"params": nn.unbox(p)}, x, deterministic=False, mutable=["moe"]),
      params, x, batch_partitions=part.batch_partitions)
  assert len(geometries) == 1
  return geometries[0]


@pytest.mark.parametrize("router", ["top2", "expert_choice"])
def test_expert_parallel_forward_gathers_nothing(router):
  """Routing partitions along the group axis (no lax.top_k all-gather of the router
  probabilities) and the experts get their tokens by all-to-all alone."""
  part = make((2, 4, 1))
  fwd = _compiled(part, moe(router, 4), False)
  assert "all-to-all" in fwd and not _collective_shapes(fwd, "all-gather")


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1)])
def test_compiled_expert_parallel_layer_uses_all_to_all(shape):
  part = make(shape)
  x_parts = part.mesh_sizes["expert"]
  layer = moe("top1", x_parts)
  fwd, train = _compiled(part, layer, False), _compiled(part, layer, True)
  assert "all-to-all" in fwd
  for hlo in (fwd, train):
    for shapes in _collective_shapes(hlo, "all-gather"):
      for s in shapes:  # never the full expert weights [e,m,h] / [e,h,m]
        assert sorted(s) != sorted((8, M, H)) and math.prod(s) < 8 * M * H, s

  # The planner's all-to-all figures are what the compiled program sends (f32: 4 bytes).
  planned = memory_planner.moe_layer_bytes(part, _geometry(layer, part))
  sent = lambda hlo: sum(math.prod(s) for shapes in _collective_shapes(hlo, "all-to-all")  # noqa
                         for s in shapes) * 4 * (x_parts - 1) // x_parts
  assert sent(fwd) == planned["all_to_all_forward"]
  assert sent(train) == planned["all_to_all_forward"] + planned["all_to_all_backward"]


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2)])
def test_expert_parallel_dropless_keeps_experts_sharded(shape):
  """No collective ever carries the full expert weights; the tokens travel by all-gather and
  reduce-scatter over the expert axis."""
  part = make(shape)
  hlo = _compiled(part, moe("top2", part.num_expert_partitions, "dropless"), True)
  assert "reduce-scatter" in hlo
  full_weights = {(8, M, H), (8, H, M)}
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    for shapes in _collective_shapes(hlo, op):
      assert not full_weights & set(shapes), (op, shapes)


def test_data_parallel_layer_has_no_all_to_all():
  part = make((8, 1, 1))
  assert "all-to-all" not in _compiled(part, moe("top1", 1), True)


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_planner_matches_real_shards(shape):
  part = make(shape)
  layer = moe("top2", part.num_expert_partitions)
  geometry = _geometry(layer, part)
  # By hand: 64 tokens in 8 groups of 8; top-2 capacity ceil(2 · 1.0 · 8 / 8) = 2.
  assert (geometry.num_groups, geometry.group_size, geometry.capacity) == (8, 8, 2)

  abstract, host = layer_params(layer)
  opt = optax.adafactor(1e-2, min_dim_size_to_factor=8)
  plan = memory_planner.plan_memory(part, abstract["params"], opt, [geometry])
  params = jax.device_put(host, part.params_shardings(abstract)["params"])
  state = part.jit(opt.init, out_shardings=part.opt_state_shardings(opt, abstract["params"]))(
      params)
  assert plan.params == bytes_per_device(params)
  assert plan.opt_state == bytes_per_device(state)
  # (The expert buffers [e,g,c,m] are checked against the compiled all-to-alls above.)


# ---- multi-host ------------------------------------------------------------------------------

def test_two_processes_match_one():
  """2 processes x 4 CPU devices (gloo), each feeding its half of the batch, on a 2x4 mesh ==
  one process with 8 devices."""
  outs = multihost_worker.launch([sys.executable, multihost_worker.WORKER, "moe_sgd",
                                  "--steps", "3"], num_processes=2, devices_per_process=4)
  results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 8 for r in results)
  single = multihost_worker.moe_sgd_losses(3)
  assert single[-1] < single[0]
  for r in results:
    np.testing.assert_allclose(r["losses"], single, rtol=1e-5)
