"""T5 layers against NumPy references and HF transformers' relative position bucketing."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch

from moe_jax import layers


def _unbox(tree):
  return flax.core.meta.unbox(tree)


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  mod = layers.RMSNorm(epsilon=1e-6)
  variables = mod.init(jax.random.key(0), x)
  scale = np.random.default_rng(1).normal(size=8).astype(np.float32)
  y = mod.apply({"params": {"scale": scale}}, x)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  assert variables["params"]["scale"].names == ("embed",)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
  relative = np.arange(-300, 301)
  ours = layers.relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional,
                                         num_buckets, max_distance)
  theirs = hf_switch.SwitchTransformersAttention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_relative_position_bucket_small_offsets_are_exact():
  # Written from the T5 paper: offsets below num_buckets/4 (bidirectional) get their own bucket;
  # a causal stack maps every future offset to bucket 0.
  rel = jnp.arange(-7, 8)
  bi = np.asarray(layers.relative_position_bucket(rel, True, 32, 128))
  np.testing.assert_array_equal(bi[:8], np.arange(7, -1, -1))  # past: 7..0
  np.testing.assert_array_equal(bi[8:], 16 + np.arange(1, 8))  # future: offset half
  causal = np.asarray(layers.relative_position_bucket(rel, False, 32, 128))
  np.testing.assert_array_equal(causal, np.r_[np.arange(7, 0, -1), np.zeros(8, int)])


def _np_attention(xq, xkv, wq, wk, wv, wo, mask, bias):
  b, q, _ = xq.shape
  h = wq.shape[1]
  out = np.zeros((b, q, wo.shape[-1]), np.float64)
  for bi in range(b):
    for hi in range(h):
      qh = xq[bi] @ wq[:, hi]
      kh = xkv[bi] @ wk[:, hi]
      vh = xkv[bi] @ wv[:, hi]
      logits = qh @ kh.T + bias[0, hi]
      logits = np.where(mask[bi, 0], logits, -1e10)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi] += (p @ vh) @ wo[hi]
  return out


def test_attention_matches_numpy_with_mask_and_bias():
  rng = np.random.default_rng(0)
  b, q, k, m, h, d = 2, 5, 7, 12, 3, 4
  xq = rng.normal(size=(b, q, m)).astype(np.float32)
  xkv = rng.normal(size=(b, k, m)).astype(np.float32)
  mask = rng.random((b, 1, q, k)) > 0.3
  mask[..., 0] = True
  bias = rng.normal(size=(1, h, q, k)).astype(np.float32)
  mod = layers.MultiHeadDotProductAttention(num_heads=h, head_dim=d)
  params = _unbox(mod.init(jax.random.key(0), xq, xkv, mask, bias, deterministic=True))["params"]
  y = mod.apply({"params": params}, xq, xkv, mask, bias, deterministic=True)
  p = {n: np.asarray(v, np.float64) for n, v in params.items()}
  expected = _np_attention(xq, xkv, p["query"], p["key"], p["value"], p["out"], mask, bias)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_attention_params_have_logical_axes_and_t5_init_scale():
  m, h, d = 64, 4, 16
  mod = layers.MultiHeadDotProductAttention(num_heads=h, head_dim=d)
  x = jnp.ones((1, 2, m))
  params = mod.init(jax.random.key(0), x, x, deterministic=True)["params"]
  assert params["query"].names == ("embed", "heads", "kv")
  assert params["out"].names == ("heads", "kv", "embed")
  # T5 folds 1/sqrt(d_kv) into the query init: std (m·d)^-1/2 vs m^-1/2 for keys.
  q_std = float(np.std(params["query"].value))
  k_std = float(np.std(params["key"].value))
  assert q_std == pytest.approx((m * d) ** -0.5, rel=0.1)
  assert k_std == pytest.approx(m ** -0.5, rel=0.1)


@pytest.mark.parametrize("activations", [("relu",), ("gelu", "linear")])
def test_mlp_block_matches_numpy(activations):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  mod = layers.MlpBlock(intermediate_dim=16, activations=activations)
  boxed = mod.init(jax.random.key(0), x, deterministic=True)["params"]
  params = _unbox(boxed)
  y = mod.apply({"params": params}, x, deterministic=True)
  if activations == ("relu",):
    assert boxed["wi"].names == ("embed", "mlp") and boxed["wo"].names == ("mlp", "embed")
    hidden = np.maximum(x @ params["wi"], 0)
  else:
    a = x @ params["wi_0"]
    gelu = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    hidden = gelu * (x @ params["wi_1"])
  np.testing.assert_allclose(y, hidden @ params["wo"], rtol=1e-5, atol=1e-5)


def test_mlp_block_rejects_unknown_activation():
  with pytest.raises(ValueError, match="unknown"):
    layers.MlpBlock(intermediate_dim=4, activations=("gelu_exact",))


def test_make_attention_mask_packed_and_causal():
  valid = np.array([[1, 1, 1, 1, 1, 0]], bool)
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(layers.make_attention_mask(jnp.asarray(valid), jnp.asarray(valid),
                                               jnp.asarray(seg), jnp.asarray(seg), causal=True))
  expected = np.zeros((1, 1, 6, 6), bool)
  for i in range(6):
    for j in range(6):
      expected[0, 0, i, j] = valid[0, i] and valid[0, j] and seg[0, i] == seg[0, j] and j <= i
  np.testing.assert_array_equal(mask, expected)


def test_relative_position_biases_lookup():
  mod = layers.RelativePositionBiases(num_heads=2, num_buckets=8, max_distance=20)
  pos = jnp.arange(5)
  params = _unbox(mod.init(jax.random.key(0), pos, pos, bidirectional=True))["params"]
  bias = np.asarray(mod.apply({"params": params}, pos, pos, bidirectional=True))
  table = np.asarray(params["rel_embedding"])
  assert bias.shape == (1, 2, 5, 5)
  for i in range(5):
    for j in range(5):
      bucket = int(layers.relative_position_bucket(jnp.array(j - i), True, 8, 20))
      np.testing.assert_array_equal(bias[0, :, i, j], table[:, bucket])


def test_embed_attend_is_transpose_of_lookup():
  mod = layers.Embed(num_embeddings=10, features=4)
  params = _unbox(mod.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  table = np.asarray(params["embedding"])
  x = np.random.default_rng(0).normal(size=(1, 2, 4)).astype(np.float32)
  logits = mod.apply({"params": params}, jnp.asarray(x), method=layers.Embed.attend)
  np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-6)
  ids = jnp.array([[3, 7]])
  np.testing.assert_array_equal(mod.apply({"params": params}, ids), table[[3, 7]][None])
