"""T5 building blocks: RMS norm, embeddings, relative position bias, attention, dense MLP.

Semantics follow T5 / Mesh-TF (and so t5x and HF transformers): no 1/sqrt(d_kv) in attention
(it is folded into the query initialization), bucketed relative position bias shared by all
layers of a stack, RMS layer norm without mean subtraction or bias.

Every parameter carries logical axis names (docs/design.md, section 5; moe_jax.partitioning)
and key activations are constrained with logical names; both are no-ops without rules and a
mesh.
Shape letters: b batch, l length (q query / k key length), m d_model, h heads, d d_kv, f d_ff,
v vocab.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# A large negative attention bias: masked logits vanish under softmax without producing NaN
# for rows that are fully masked (padding queries).
NEG_INF = -1e10

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # tanh approximation, as T5 v1.1 ("gelu_new" in HF transformers)
    "silu": nn.silu,
    "linear": lambda x: x,
}


def check_activations(activations: Sequence[str]) -> None:
  """Raise a one-line ValueError for an activation name not in ACTIVATIONS."""
  unknown = [a for a in activations if a not in ACTIVATIONS]
  if unknown:
    raise ValueError(f"activations={tuple(activations)} has unknown {unknown}; "
                     f"known: {sorted(ACTIVATIONS)}")


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x²) + eps) · scale, computed in float32. x [..., m]."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (y * jnp.asarray(scale, jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [v, m] (init N(0, 1) as T5); `attend` gives tied output logits."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    """ids [b,l] int -> [b,l,m]."""
    x = jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x: Array) -> Array:
    """x [b,l,m] -> logits [b,l,v] against the embedding table."""
    return jnp.einsum("blm,vm->blv", x, jnp.asarray(self.embedding, self.dtype))


def relative_position_bucket(relative_position: Array, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5 / Mesh-TF bucketing of relative positions (memory − query) into [0, num_buckets).

  Half the buckets (per direction when bidirectional) hold exact small distances, the other
  half logarithmically wider bins up to max_distance; farther distances share the last bucket.
  Causal (not bidirectional) maps all positive (future) offsets to bucket 0. The log is taken in
  float32 in the same order of operations as Mesh-TF / HF so bucket edges agree exactly.
  """
  ret = jnp.zeros_like(relative_position)
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n > 0).astype(relative_position.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = -jnp.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # n >= max_exact on the branch that is used; the maximum keeps log away from 0.
  scaled = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
            / np.float32(math.log(max_distance / max_exact)) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """Bucketed relative position bias, one table per stack: rel_embedding [h, num_buckets]."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool) -> Array:
    """query_positions [q], key_positions [k] int -> bias [1,h,q,k]."""
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                     ("heads", "unmodeled")),
        (self.num_heads, self.num_buckets), jnp.float32)
    relative = key_positions[None, :] - query_positions[:, None]  # [q,k]
    bucket = relative_position_bucket(relative.astype(jnp.int32), bidirectional,
                                      self.num_buckets, self.max_distance)
    bias = jnp.take(jnp.asarray(table, self.dtype), bucket, axis=1)  # [h,q,k]
    return bias[None]


def _kernel_init(in_axis, out_axis, scale: float = 1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=in_axis,
                                          out_axis=out_axis)


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention (no score scaling; the query init carries d_kv^-0.5).

  Params: query/key/value kernel [m,h,d] ('embed','heads','kv'), out kernel [h,d,m].
  With decode=True (self-attention only) it keeps cached_key / cached_value [b,L,h,d] and
  cache_index in the 'cache' collection: the first (initializing) call sizes the cache from a
  full-length input, every later call takes one token [b,1,m], writes it at cache_index and
  attends to positions <= cache_index.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  init_scale: float = 1.0  # variance-scaling scale of every kernel (Switch Sec. 2.4: 0.1)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None,
               bias: Array | None = None, *, deterministic: bool, decode: bool = False) -> Array:
    """inputs_q [b,q,m], inputs_kv [b,k,m]; mask broadcastable to [b,h,q,k] (True = attend);
    bias broadcastable to [b,h,q,k] (relative position bias) -> [b,q,m]."""
    h, d = self.num_heads, self.head_dim
    m = inputs_q.shape[-1]
    qkv_axes = ("embed", "heads", "kv")

    def project(name, x, init):
      w = self.param(name, nn.with_logical_partitioning(init, qkv_axes), (m, h, d), jnp.float32)
      y = jnp.einsum("blm,mhd->blhd", x.astype(self.dtype), jnp.asarray(w, self.dtype))
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    # T5 folds the 1/sqrt(d_kv) of scaled dot-product attention into the query init.
    scale = self.init_scale
    query = project("query", inputs_q, _kernel_init(0, (1, 2), scale / d))
    key = project("key", inputs_kv, _kernel_init(0, (1, 2), scale))
    value = project("value", inputs_kv, _kernel_init(0, (1, 2), scale))

    if decode:
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        b, length = cached_key.value.shape[:2]
        if inputs_q.shape[1] != 1:
          raise ValueError(f"decode=True takes one token per call, got length {inputs_q.shape[1]}")
        i = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, i, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, i, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = i + 1
        # Attend to the filled part of the cache only (positions <= i).
        filled = (jnp.arange(length) <= i)[None, None, None, :]
        mask = filled if mask is None else jnp.logical_and(mask, filled)

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    wo = self.param("out", nn.with_logical_partitioning(_kernel_init((0, 1), 2, scale),
                                                        ("heads", "kv", "embed")),
                    (h, d, m), jnp.float32)
    out = jnp.einsum("bqhd,hdm->bqm", y, jnp.asarray(wo, self.dtype))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
  """Dense T5 feed-forward: activations ('relu',) = v1.0 (wi, wo); ('gelu', 'linear') =
  v1.1 gated-gelu (wi_0, wi_1, wo). wi [m,f] ('embed','mlp'), wo [f,m] ('mlp','embed')."""
  intermediate_dim: int
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  init_scale: float = 1.0  # variance-scaling scale of wi and wo (Switch Sec. 2.4: 0.1)

  def __post_init__(self):
    check_activations(self.activations)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """x [b,l,m] -> [b,l,m]."""
    m = x.shape[-1]
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    hidden = 1.0
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      w = self.param(name, nn.with_logical_partitioning(init, ("embed", "mlp")),
                     (m, self.intermediate_dim), jnp.float32)
      hi = jnp.einsum("blm,mf->blf", x.astype(self.dtype), jnp.asarray(w, self.dtype))
      hidden = hidden * ACTIVATIONS[act](hi)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    # Dropout mask shared over the length axis, as t5x.
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden,
                                                                 deterministic=deterministic)
    wo = self.param("wo", nn.with_logical_partitioning(init, ("mlp", "embed")),
                    (self.intermediate_dim, m), jnp.float32)
    y = jnp.einsum("blf,fm->blm", hidden, jnp.asarray(wo, self.dtype))
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def make_attention_mask(query_valid: Array, key_valid: Array,
                        query_segment_ids: Array | None = None,
                        key_segment_ids: Array | None = None, causal: bool = False) -> Array:
  """[b,q] and [b,k] bool (True = real token) -> mask [b,1,q,k]: both tokens real, in the same
  segment when packed, and key position <= query position when causal."""
  mask = query_valid[:, :, None] & key_valid[:, None, :]
  if query_segment_ids is not None:
    mask = mask & (query_segment_ids[:, :, None] == key_segment_ids[:, None, :])
  if causal:
    q, k = query_valid.shape[1], key_valid.shape[1]
    mask = mask & (jnp.arange(q)[:, None] >= jnp.arange(k)[None, :])[None]
  return mask[:, None]
