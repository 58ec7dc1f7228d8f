"""switch_tiny (top-1), gshard_tiny (top-2, also dropless) and expert_choice_tiny give the same
loss and the same gradients on every mesh as on one device: sharding changes nothing but the
layout, and no ×num_expert_partitions rescale is needed (or applied)."""
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from moe_jax import config, partitioning

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]
MODELS = {
    "top1": ("models/switch_tiny.gin", []),
    "top2": ("models/gshard_tiny.gin", []),
    "expert_choice": ("models/expert_choice_tiny.gin", []),
    "top2_dropless": ("models/gshard_tiny.gin", ["moe_layer.MoeLayer.dispatch = 'dropless'"]),
}
# 8 sequences of 16 tokens in groups of 16: 8 groups in every MoE layer on every mesh, so the
# routing problem is the same everywhere; capacity factor 1 so some tokens are dropped.
B, L = 8, 16
SMALL = ["EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64", "GROUP_SIZE = 16",
         "TRAIN_CAPACITY_FACTOR = 1.0", "MIN_EXPERT_CAPACITY = 1", "ROUTER_JITTER_NOISE = 0.01",
         "DROPOUT_RATE = 0.1"]


def batch():
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(2, 2000, (B, L)).astype(np.int32)  # noqa: E731
  b = {"encoder_input_tokens": tokens(), "decoder_input_tokens": tokens(),
       "decoder_target_tokens": tokens(), "decoder_loss_weights": np.ones((B, L), np.float32)}
  b["encoder_input_tokens"][:, -3:] = 0  # padding is never routed
  return b


def loss_and_grads(router: str, mesh_shape: tuple[int, int, int], params=None):
  """(loss, grads, params) of one training step's loss on `mesh_shape` (None: no mesh)."""
  gin_file, bindings = MODELS[router]
  expert = 1 if mesh_shape is None else mesh_shape[1]
  model = config.build_model([gin_file], SMALL + bindings + [f"NUM_EXPERT_PARTITIONS = {expert}"])
  try:
    shapes = {"encoder_input_tokens": (B, L), "decoder_input_tokens": (B, L)}
    if params is None:
      params = nn.unbox(model.get_initial_variables(jax.random.key(0), shapes)["params"])
    grad_fn = jax.value_and_grad(lambda p, b, r: model.loss_fn(p, b, r)[0])
    if mesh_shape is None:
      loss, grads = jax.jit(grad_fn)(params, batch(), jax.random.key(1))
    else:
      part = partitioning.Partitioner(mesh_shape=mesh_shape,
                                      devices=jax.devices()[:int(np.prod(mesh_shape))])
      abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
      p_sh = part.params_shardings(abstract)["params"]
      b_sh = {k: part.data_sharding(2) for k in batch()}
      fn = part.jit(grad_fn, in_shardings=(p_sh, b_sh, None), out_shardings=(None, p_sh))
      loss, grads = fn(jax.device_put(params, p_sh), part.shard_batch(batch()), jax.random.key(1))
    return float(loss), jax.tree.map(np.asarray, grads), params
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def references():
  return {}


@pytest.mark.parametrize("router", sorted(MODELS))
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_model_matches_one_device(router, mesh_shape, references):
  if router not in references:
    references[router] = loss_and_grads(router, None)
  want_loss, want_grads, params = references[router]
  loss, grads, _ = loss_and_grads(router, mesh_shape, params)
  assert loss == pytest.approx(want_loss, rel=1e-5)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  assert len(flat) == len(want)
  for path, g in flat:
    np.testing.assert_allclose(g, want[path], rtol=1e-4, atol=1e-6, err_msg=str(path))
  expert_grads = [g for path, g in flat if "wi" in jax.tree_util.keystr(path) and g.ndim == 3]
  assert expert_grads and all(np.abs(g).max() > 0 for g in expert_grads)
