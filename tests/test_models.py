"""Encoder-decoder model: sparse placement, masks and packing, loss and metrics, rng streams."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax import moe_layer
from moe_jax import routing

VOCAB = 40
AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "joined_kv", "vocab", "expert",
        "expert_mlp", "expert_replicas", "unmodeled"}


def make_model(enc_step=2, dec_step=2, num_layers=2, num_experts=4, eval_cf=2.0,
               dropout_rate=0.0, encoder_router=None, decoder_router=None, **model_kwargs):
  cfg = models.T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                        num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                        dropout_rate=dropout_rate, encoder_sparse_step=enc_step,
                        decoder_sparse_step=dec_step)

  def template(router_fn):
    router = (router_fn or (lambda: routing.TokensChooseRouter(num_experts=num_experts)))()
    return moe_layer.MoeLayer(num_experts=num_experts, d_ff=24, router=router,
                              eval_capacity_factor=eval_cf)

  module = models.Transformer(cfg, encoder_moe=template(encoder_router),
                              decoder_moe=template(decoder_router))
  return models.EncoderDecoderModel(module, **model_kwargs)


def make_batch(seed=0, b=2, le=6, ld=5, pad=True):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, VOCAB, (b, le)).astype(np.int32)
  tgt = rng.integers(2, VOCAB, (b, ld)).astype(np.int32)
  if pad:
    enc[-1, le - 2:] = 0
    tgt[-1, ld - 2:] = 0
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt > 0).astype(np.float32))


def init(model, batch, seed=0):
  """(abstract boxed variables, random params). Params are drawn with NumPy from the abstract
  tree: real initializers cost long XLA compiles on CPU and these tests check wiring, not init."""
  shapes = {k: v.shape for k, v in batch.items()}
  boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if leaf.ndim == 1:  # layer-norm scales
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    return (0.25 * rng.normal(size=leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map(draw, flax.core.meta.unbox(boxed)["params"])
  return boxed, params


def moe_paths(params):
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return sorted({k.split("/mlp/router")[0] for k in flat if "/mlp/router/" in k})


@pytest.mark.parametrize("num_layers,step,expected", [
    (12, 2, [1, 3, 5, 7, 9, 11]), (12, 1, list(range(12))), (12, 0, []), (6, 3, [1, 4]),
    (2, 2, [1]), (15, 1, list(range(15))), (1, 2, [])])
def test_sparse_layer_placement(num_layers, step, expected):
  assert models.sparse_layers(num_layers, step) == expected


@pytest.mark.parametrize("enc_step,dec_step", [(2, 2), (1, 0), (0, 1), (0, 0), (3, 1)])
def test_moe_layers_sit_where_placed(enc_step, dec_step):
  model = make_model(enc_step, dec_step, num_layers=4)
  abstract = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.key(0), {"encoder_input_tokens": (2, 4), "decoder_input_tokens": (2, 3)}))
  expected = ([f"decoder/layers_{i}" for i in models.sparse_layers(4, dec_step)]
              + [f"encoder/layers_{i}" for i in models.sparse_layers(4, enc_step)])
  assert moe_paths(abstract["params"]) == expected


def test_every_param_has_logical_axes():
  model = make_model(1, 2)
  boxed, _ = init(model, make_batch())
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXES, (path, leaf.names)


def test_untied_model_has_logits_dense():
  cfg = models.T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                        num_encoder_layers=1, num_decoder_layers=1, logits_via_embedding=False,
                        activations=("gelu", "linear"))
  model = models.EncoderDecoderModel(models.Transformer(cfg))
  boxed, params = init(model, make_batch())
  assert boxed["params"]["decoder"]["logits_dense"].names == ("embed", "vocab")
  assert set(params["decoder"]["layers_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}


def test_decoder_refuses_routers_that_see_future_tokens():
  batch = make_batch()
  experts_choice = lambda: routing.ExpertsChooseRouter(num_experts=4)  # noqa: E731
  # Encoder expert choice is fine.
  init(make_model(encoder_router=experts_choice), batch)
  with pytest.raises(ValueError, match="future"):
    init(make_model(decoder_router=experts_choice), batch)
  prioritized = lambda: routing.TokensChooseRouter(  # noqa: E731
      num_experts=4, batch_prioritized=True)
  with pytest.raises(ValueError, match="future"):
    init(make_model(decoder_router=prioritized), batch)


def test_sparse_step_needs_a_moe_template():
  cfg = models.T5Config(vocab_size=VOCAB, emb_dim=8, num_heads=1, head_dim=8, mlp_dim=8,
                        num_encoder_layers=2, num_decoder_layers=2, encoder_sparse_step=2)
  with pytest.raises(ValueError, match="encoder_moe"):
    init(models.EncoderDecoderModel(models.Transformer(cfg)), make_batch())


@functools.cache
def model_a():
  """The shared MoE model (first layer dense, second sparse, in both stacks), its params and
  jitted entry points, compiled once for this module. Capacity never binds in eval."""
  model = make_model(2, 2, eval_cf=8.0, dropout_rate=0.1, router_z_loss_factor=1e-3)
  _, params = init(model, make_batch())

  def apply(params, batch):
    logits, state = model.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"), deterministic=True, mutable=["moe"])
    return logits, state["moe"]

  fns = dict(loss=jax.jit(model.loss_fn), eval=jax.jit(model.eval_fn), apply=jax.jit(apply),
             score=jax.jit(model.score_batch))
  return model, params, fns


def _moe_calls(fn, *args):
  """Trace fn(*args) abstractly; record (path, causal, deterministic) of every MoeLayer call."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, moe_layer.MoeLayer) and context.method_name == "__call__":
      calls.append(("/".join(context.module.path), context.module.causal,
                    kwargs["deterministic"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(fn, *args)
  return calls


def test_moe_layers_are_causal_in_the_decoder_and_deterministic_in_eval():
  model = make_model(1, 1)
  batch = make_batch()
  _, params = init(model, batch)
  calls = _moe_calls(model.eval_fn, params, batch)
  assert calls == [("encoder/layers_0/mlp", False, True), ("encoder/layers_1/mlp", False, True),
                   ("decoder/layers_0/mlp", True, True), ("decoder/layers_1/mlp", True, True)]
  calls = _moe_calls(lambda p, b: model.loss_fn(p, b, jax.random.key(0)), params, batch)
  assert [c[2] for c in calls] == [False] * 4


def test_moe_layers_get_the_padding_mask():
  model, params, _ = model_a()
  batch = make_batch()
  masks = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, moe_layer.MoeLayer) and context.method_name == "__call__":
      path = "/".join(context.module.path)
      jax.debug.callback(lambda m, path=path: masks.__setitem__(path, np.asarray(m)), args[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.block_until_ready(jax.jit(model.eval_fn)(params, batch))
  assert sorted(masks) == ["decoder/layers_1/mlp", "encoder/layers_1/mlp"]
  np.testing.assert_array_equal(masks["encoder/layers_1/mlp"], batch["encoder_input_tokens"] > 0)
  np.testing.assert_array_equal(masks["decoder/layers_1/mlp"], batch["decoder_target_tokens"] > 0)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_with_z_loss_matches_numpy(label_smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)) * 3
  targets = rng.integers(0, 7, (2, 3))
  ce, z = models.cross_entropy_with_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                           1e-4, label_smoothing)
  v = logits.shape[-1]
  conf, low = 1 - label_smoothing, label_smoothing / (v - 1)
  log_p = _np_log_softmax(logits)
  for i in np.ndindex(targets.shape):
    soft = np.full(v, low)
    soft[targets[i]] = conf
    # KL(soft || p): a prediction equal to the smoothed targets scores 0.
    entropy = -sum(q * np.log(q) for q in soft if q > 0)
    np.testing.assert_allclose(ce[i], -(soft * log_p[i]).sum() - entropy, rtol=1e-5, atol=1e-6)
    lse = np.log(np.exp(logits[i]).sum())
    np.testing.assert_allclose(z[i], 1e-4 * lse ** 2, rtol=1e-5)


def test_loss_and_metrics_match_numpy():
  model, params, fns = model_a()
  batch = make_batch()
  batch["decoder_loss_weights"][0, 1] = 0.0  # the weights, not the padding, decide what counts
  loss, metrics = fns["eval"](params, batch)

  logits, moe = fns["apply"](params, batch)
  logits = np.asarray(logits, np.float64)
  w = batch["decoder_loss_weights"]
  tgt = batch["decoder_target_tokens"]
  log_p = _np_log_softmax(logits)
  lse = np.log(np.exp(logits).sum(-1))
  ce = -np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
  ce_loss = (ce * w).sum() / w.sum()
  z = 1e-4 * (lse ** 2 * w).sum() / w.sum()
  moe = flax.traverse_util.flatten_dict(moe, sep="/")
  lb = [v[0] for k, v in moe.items() if k.endswith("load_balance_loss")]
  rz = [v[0] for k, v in moe.items() if k.endswith("router_z_loss")]
  assert len(lb) == 2 and len(rz) == 2
  np.testing.assert_allclose(metrics["cross_ent_loss"], ce_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(metrics["aux_loss"], 0.01 * np.mean(lb), rtol=1e-5)
  np.testing.assert_allclose(metrics["router_z_loss"], 1e-3 * np.mean(rz), rtol=1e-5)
  np.testing.assert_allclose(loss, ce_loss + z + 0.01 * np.mean(lb) + 1e-3 * np.mean(rz),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["num_tokens"], w.sum())
  acc = ((logits.argmax(-1) == tgt) * w).sum() / w.sum()
  np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
  for layer in ("encoder/layers_1/mlp", "decoder/layers_1/mlp"):
    for name in ("load_balance_loss", "router_z_loss", "fraction_dropped", "router_confidence",
                 "router_entropy"):
      assert np.ndim(metrics[f"moe/{layer}/{name}"]) == 0
    assert metrics[f"moe/{layer}/expert_load"].shape == (4,)


def test_score_batch_is_target_log_likelihood():
  _, params, fns = model_a()
  batch = make_batch()
  scores = fns["score"](params, batch)
  log_p = _np_log_softmax(np.asarray(fns["apply"](params, batch)[0], np.float64))
  tgt = batch["decoder_target_tokens"]
  expected = [sum(log_p[b, t, tgt[b, t]] for t in range(tgt.shape[1]) if tgt[b, t] > 0)
              for b in range(tgt.shape[0])]
  np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_dense_model_has_zero_aux_terms():
  model = make_model(0, 0, num_layers=1)
  batch = make_batch()
  _, params = init(model, batch)
  loss, metrics = jax.jit(model.loss_fn)(params, batch, jax.random.key(0))
  assert float(metrics["aux_loss"]) == 0.0 and float(metrics["router_z_loss"]) == 0.0
  assert not [k for k in metrics if k.startswith("moe/")]
  np.testing.assert_allclose(loss, metrics["cross_ent_loss"] + metrics["z_loss"], rtol=1e-6)


def test_packed_batch_equals_separate_examples():
  # Capacity never binds, so routing is per token and packing must not change any logit.
  _, params, fns = model_a()
  examples = [(np.array([5, 6, 7, 1]), np.array([9, 10, 1])),
              (np.array([11, 12, 1]), np.array([13, 1]))]
  le, ld = 7, 5
  sep = {k: np.zeros_like(v) for k, v in make_batch(b=2, le=le, ld=ld).items()}
  packed = {k: np.zeros((1, v.shape[1]), v.dtype) for k, v in sep.items()}
  for stack, length in (("encoder", le), ("decoder", ld)):
    packed[f"{stack}_segment_ids"] = np.zeros((1, length), np.int32)
    packed[f"{stack}_positions"] = np.zeros((1, length), np.int32)
  e0 = d0 = 0
  for i, (enc, tgt) in enumerate(examples):
    dec_in = np.r_[0, tgt[:-1]]
    ne, nd = len(enc), len(tgt)
    sep["encoder_input_tokens"][i, :ne] = enc
    sep["decoder_target_tokens"][i, :nd] = tgt
    sep["decoder_input_tokens"][i, :nd] = dec_in
    packed["encoder_input_tokens"][0, e0:e0 + ne] = enc
    packed["encoder_segment_ids"][0, e0:e0 + ne] = i + 1
    packed["encoder_positions"][0, e0:e0 + ne] = np.arange(ne)
    packed["decoder_target_tokens"][0, d0:d0 + nd] = tgt
    packed["decoder_input_tokens"][0, d0:d0 + nd] = dec_in
    packed["decoder_segment_ids"][0, d0:d0 + nd] = i + 1
    packed["decoder_positions"][0, d0:d0 + nd] = np.arange(nd)
    e0, d0 = e0 + ne, d0 + nd
  sep_logits = np.asarray(fns["apply"](params, sep)[0])
  packed_logits = np.asarray(fns["apply"](params, packed)[0])
  np.testing.assert_allclose(packed_logits[0, :3], sep_logits[0, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 3:5], sep_logits[1, :2], rtol=1e-5, atol=1e-5)


def test_rng_drives_dropout_and_jitter_only_when_given():
  _, params, fns = model_a()
  batch = make_batch()
  a, _ = fns["loss"](params, batch, jax.random.key(1))
  b, _ = fns["loss"](params, batch, jax.random.key(2))
  c, _ = fns["loss"](params, batch, jax.random.key(1))
  d, _ = fns["eval"](params, batch)
  assert float(a) != float(b) and float(a) != float(d)
  assert float(a) == float(c)


def test_gradients_reach_every_parameter():
  model, params, _ = model_a()
  batch = make_batch()
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, jax.random.key(0))[0]))(params)
  for path, g in flax.traverse_util.flatten_dict(grads, sep="/").items():
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
