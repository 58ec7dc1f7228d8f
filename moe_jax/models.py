"""Switch / GShard T5 encoder-decoder: sparse-layer placement, loss, metrics, score and predict.

`Transformer` is the flax module (T5 v1.0 or v1.1 blocks, dense or MoE feed-forward per layer);
`EncoderDecoderModel` wraps it with the t5x model API the trainer uses (initial variables, loss,
eval, score, predict). Batches use t5x feature names (encoder_input_tokens, decoder_input_tokens,
decoder_target_tokens, decoder_loss_weights, and for packed batches *_segment_ids and
*_positions). PAD = 0 (also the decoder's start token), EOS = 1.

Sparse placement (HF transformers / Switch convention), per stack: sparse_step 0 = no MoE layer
(dense baseline), 1 = every layer, N > 1 = layer i is sparse iff i % N == 1 (N = 2: every other
layer, starting with the second).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import decoding
from moe_jax import layers
from moe_jax import moe_layer

Array = jax.Array
EOS_ID = 1  # PAD (0) also serves as the decoder's start token


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Dimensions and options of a T5 encoder-decoder (dense parts; experts are configured on
  moe_layer.MoeLayer through gin).

  activations: ('relu',) T5 v1.0 / Switch; ('gelu', 'linear') T5 v1.1 gated-gelu.
  logits_via_embedding: tied output embedding (the decoder output is scaled by emb_dim^-0.5
    before the head, as Mesh-TF); False: separate logits_dense [m, v].
  shared_input_embedding: one input embedding for encoder and decoder (T5, Switch); False gives
    each stack its own (encoder_token_embedder, decoder_token_embedder), as transformers 5
    saves a model with tie_word_embeddings=False.
  encoder_sparse_step / decoder_sparse_step: see the module docstring.
  init_scale: variance-scaling scale of the attention, dense MLP and logits_dense kernels (1.0
    as T5; the Switch paper, Sec. 2.4, uses 0.1 for all weights). Embeddings and the relative
    position bias keep their own init; MoE experts take MoeLayer.init_scale.
  dtype: activation dtype ('float32' or 'bfloat16'); params and softmaxes stay float32.
  """
  vocab_size: int
  emb_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  activations: tuple[str, ...] = ("relu",)
  dropout_rate: float = 0.1
  logits_via_embedding: bool = True
  shared_input_embedding: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  encoder_sparse_step: int = 0
  decoder_sparse_step: int = 0
  init_scale: float = 1.0
  dtype: Any = "float32"

  def __post_init__(self):
    # Gin hands over lists; a frozen config should hold hashable values.
    object.__setattr__(self, "activations", tuple(self.activations))
    layers.check_activations(self.activations)
    for name in ("encoder_sparse_step", "decoder_sparse_step"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = no MoE layers)")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def is_sparse_layer(index: int, sparse_step: int) -> bool:
  """Whether layer `index` of a stack holds an MoE feed-forward (HF / Switch placement)."""
  if sparse_step == 0:
    return False
  return sparse_step == 1 or index % sparse_step == 1


def sparse_layers(num_layers: int, sparse_step: int) -> list[int]:
  return [i for i in range(num_layers) if is_sparse_layer(i, sparse_step)]


def _make_mlp(config: T5Config, moe: moe_layer.MoeLayer | None, causal: bool) -> nn.Module:
  """The feed-forward of a layer: a fresh unbound copy of the stack's MoE template (so each
  layer owns its params, router included, under mlp/), or a dense MlpBlock."""
  if moe is not None:
    return moe.copy(causal=causal)  # a deep copy: the router is copied too
  return layers.MlpBlock(config.mlp_dim, config.activations, config.dropout_rate,
                         config.compute_dtype, config.init_scale)


def _apply_mlp(mlp: nn.Module, x: Array, valid: Array | None, deterministic: bool,
               decode: bool = False, decode_length: int | None = None) -> Array:
  """MoE layers also get the padding mask so padding is never routed, and while decoding the
  sequence length, so a step routes as scoring the sequence does."""
  if isinstance(mlp, layers.MlpBlock):
    return mlp(x, deterministic=deterministic)
  return mlp(x, valid, deterministic=deterministic, decode=decode, decode_length=decode_length)


class EncoderLayer(nn.Module):
  """Self-attention (bidirectional) + feed-forward, pre-norm with residuals."""
  config: T5Config
  moe: moe_layer.MoeLayer | None = None

  def setup(self):
    c = self.config
    self.pre_attention_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.attention = layers.MultiHeadDotProductAttention(c.num_heads, c.head_dim, c.dropout_rate,
                                                         c.compute_dtype, c.init_scale)
    self.pre_mlp_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.mlp = _make_mlp(c, self.moe, causal=False)
    self.dropout = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))

  def __call__(self, x: Array, mask: Array, bias: Array, valid: Array, *,
               deterministic: bool) -> Array:
    """x [b,l,m]; mask [b,1,l,l]; bias [1,h,l,l]; valid [b,l] -> [b,l,m]."""
    y = self.pre_attention_layer_norm(x)
    y = self.attention(y, y, mask, bias, deterministic=deterministic)
    x = x + self.dropout(y, deterministic=deterministic)
    y = _apply_mlp(self.mlp, self.pre_mlp_layer_norm(x), valid, deterministic)
    x = x + self.dropout(y, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Causal self-attention + encoder-decoder attention + feed-forward, pre-norm."""
  config: T5Config
  moe: moe_layer.MoeLayer | None = None

  def setup(self):
    c = self.config
    attention = lambda: layers.MultiHeadDotProductAttention(  # noqa: E731
        c.num_heads, c.head_dim, c.dropout_rate, c.compute_dtype, c.init_scale)
    self.pre_self_attention_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.self_attention = attention()
    self.pre_cross_attention_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.encoder_decoder_attention = attention()
    self.pre_mlp_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype)
    self.mlp = _make_mlp(c, self.moe, causal=True)
    self.dropout = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))

  def __call__(self, x: Array, encoded: Array, self_mask: Array | None, bias: Array,
               cross_mask: Array, valid: Array, *, deterministic: bool, decode: bool,
               decode_length: int | None = None) -> Array:
    """x [b,l,m]; encoded [b,le,m]; self_mask [b,1,l,l] (None while decoding with a cache);
    bias [1,h,l,l']; cross_mask [b,1,l,le]; valid [b,l]; decode_length: the cache length
    while stepping -> [b,l,m]."""
    y = self.pre_self_attention_layer_norm(x)
    y = self.self_attention(y, y, self_mask, bias, deterministic=deterministic, decode=decode)
    x = x + self.dropout(y, deterministic=deterministic)
    y = self.pre_cross_attention_layer_norm(x)
    y = self.encoder_decoder_attention(y, encoded, cross_mask, deterministic=deterministic)
    x = x + self.dropout(y, deterministic=deterministic)
    y = _apply_mlp(self.mlp, self.pre_mlp_layer_norm(x), valid, deterministic, decode,
                   decode_length)
    x = x + self.dropout(y, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """Token ids -> encoded [b,l,m]; one relative position bias table shared by all layers."""
  config: T5Config
  embedder: nn.Module
  moe: moe_layer.MoeLayer | None = None

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None = None, *,
               deterministic: bool) -> Array:
    c = self.config
    length = tokens.shape[1]
    valid = tokens > 0
    mask = layers.make_attention_mask(valid, valid, segment_ids, segment_ids)
    positions = jnp.arange(length)
    bias = layers.RelativePositionBiases(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        c.compute_dtype, name="relpos_bias")(positions, positions, bidirectional=True)
    dropout = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))
    x = dropout(self.embedder(tokens), deterministic=deterministic)
    for i in range(c.num_encoder_layers):
      moe = self.moe if is_sparse_layer(i, c.encoder_sparse_step) else None
      x = EncoderLayer(c, moe, name=f"layers_{i}")(x, mask, bias, valid,
                                                     deterministic=deterministic)
    x = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype, name="encoder_norm")(x)
    return dropout(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder stack + output head -> float32 logits [b,l,v].

  decode=True: the first call (from `init`, with full-length inputs) creates the attention
  caches; later calls take one token [b,1] per step and need max_decode_length (the cache
  length) to compute that step's relative position bias.
  """
  config: T5Config
  embedder: nn.Module
  moe: moe_layer.MoeLayer | None = None

  @nn.compact
  def __call__(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, *, deterministic: bool,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    c = self.config
    b, length = decoder_input_tokens.shape
    encoder_valid = encoder_input_tokens > 0
    relpos = layers.RelativePositionBiases(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        c.compute_dtype, name="relpos_bias")

    stepping = decode and self.has_variable("cache", "position")
    if stepping:
      if length != 1 or max_decode_length is None:
        raise ValueError("cached decoding takes one token per step and needs max_decode_length")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      bias = relpos(position.value[None], jnp.arange(max_decode_length), bidirectional=False)
      # A row that fed EOS or PAD after the start token is finished: like the padding after a
      # target's EOS in scoring, it takes no expert capacity.
      ids = decoder_input_tokens
      valid = ((ids != 0) & (ids != EOS_ID)) | (position.value == 0)
      position.value = position.value + 1
      self_mask = None  # the attention cache masks the positions not yet written
      cross_mask = layers.make_attention_mask(jnp.ones((b, 1), bool), encoder_valid)
    else:
      if decode:  # cache-creating call
        self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      valid = (jnp.ones((b, length), bool) if decoder_target_tokens is None
               else decoder_target_tokens > 0)
      positions = jnp.arange(length)
      bias = relpos(positions, positions, bidirectional=False)
      self_mask = layers.make_attention_mask(valid, valid, decoder_segment_ids,
                                             decoder_segment_ids, causal=True)
      cross_mask = layers.make_attention_mask(valid, encoder_valid, decoder_segment_ids,
                                              encoder_segment_ids)

    dropout = nn.Dropout(c.dropout_rate, broadcast_dims=(-2,))
    x = dropout(self.embedder(decoder_input_tokens), deterministic=deterministic)
    for i in range(c.num_decoder_layers):
      moe = self.moe if is_sparse_layer(i, c.decoder_sparse_step) else None
      x = DecoderLayer(c, moe, name=f"layers_{i}")(
          x, encoded, self_mask, bias, cross_mask, valid, deterministic=deterministic,
          decode=decode, decode_length=max_decode_length if stepping else None)
    x = layers.RMSNorm(c.layer_norm_epsilon, c.compute_dtype, name="decoder_norm")(x)
    x = dropout(x, deterministic=deterministic)

    if c.logits_via_embedding:
      # Mesh-TF rescales the decoder output before the tied head.
      logits = self.embedder.attend(x * (c.emb_dim ** -0.5))
    else:
      kernel = self.param(
          "logits_dense",
          nn.with_logical_partitioning(
              nn.initializers.variance_scaling(c.init_scale, "fan_in", "truncated_normal"),
              ("embed", "vocab")),
          (c.emb_dim, c.vocab_size), jnp.float32)
      logits = jnp.einsum("blm,mv->blv", x, jnp.asarray(kernel, c.compute_dtype))
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """T5 encoder-decoder with shared input embedding and MoE feed-forwards where configured.

  encoder_moe / decoder_moe: factories (gin: `@encoder/moe_layer.MoeLayer`, no call) that build
  an MoeLayer; the model passes causal=True in the decoder. Required when the stack's
  sparse_step > 0.
  """
  config: T5Config
  encoder_moe: moe_layer.MoeLayer | None = None
  decoder_moe: moe_layer.MoeLayer | None = None

  def setup(self):
    c = self.config
    for stack, step, factory in (("encoder", c.encoder_sparse_step, self.encoder_moe),
                                 ("decoder", c.decoder_sparse_step, self.decoder_moe)):
      if step > 0 and factory is None:
        raise ValueError(f"{stack}_sparse_step={step} needs Transformer.{stack}_moe "
                         "(an MoE layer template)")
    if c.shared_input_embedding:
      self.token_embedder = layers.Embed(c.vocab_size, c.emb_dim, c.compute_dtype)
      encoder_embedder = decoder_embedder = self.token_embedder
    else:
      self.encoder_token_embedder = layers.Embed(c.vocab_size, c.emb_dim, c.compute_dtype)
      self.decoder_token_embedder = layers.Embed(c.vocab_size, c.emb_dim, c.compute_dtype)
      encoder_embedder, decoder_embedder = self.encoder_token_embedder, self.decoder_token_embedder
    self.encoder = Encoder(c, encoder_embedder, self.encoder_moe)
    self.decoder = Decoder(c, decoder_embedder, self.decoder_moe)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None, *,
             deterministic: bool) -> Array:
    """[b,le] -> encoded [b,le,m]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array | None = None,
             encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, *, deterministic: bool,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """-> logits [b,ld,v] float32. decoder_target_tokens only serve as the padding mask."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                        deterministic=deterministic, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, *,
               deterministic: bool) -> Array:
    """Teacher-forced logits [b,ld,v] float32 (step-wise decoding: `decode` with decode=True)."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, deterministic=deterministic)


def cross_entropy_with_z_loss(logits: Array, targets: Array, z_loss: float,
                              label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Per-token cross-entropy and z-loss (t5x semantics). logits [b,l,v] f32, targets [b,l].

  Returns (cross_entropy [b,l], z_term [b,l]) where z_term = z_loss · logsumexp(logits)²; with
  label smoothing the cross-entropy is offset by the smoothed targets' entropy so a perfect
  prediction scores 0.
  """
  v = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (v - 1)
  soft = jax.nn.one_hot(targets, v) * (confidence - low) + low
  log_z = jax.nn.logsumexp(logits, axis=-1)
  cross_ent = log_z - jnp.sum(soft * logits, axis=-1)
  if label_smoothing > 0:
    cross_ent = cross_ent + (confidence * np.log(confidence)
                             + (v - 1) * low * np.log(low + 1e-20))
  return cross_ent, z_loss * jnp.square(log_z)


def soft_cross_entropy(logits: Array, teacher_logits: Array) -> Array:
  """Per-token cross-entropy against a teacher's token distribution: -Σ_v p_teacher · log
  p_student. logits, teacher_logits [b,l,v] float32 -> [b,l]."""
  teacher_probs = jax.nn.softmax(teacher_logits, axis=-1)
  return -jnp.sum(teacher_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


class EncoderDecoderModel:
  """The model the trainer sees: a `Transformer` plus its loss, metrics, scoring and decoding.

  Loss = cross-entropy (normalized by the real target tokens, decoder_loss_weights)
       + output z-loss (z_loss · logsumexp², same normalization)
       + aux_loss_factor · mean over MoE layers of the load-balance loss
       + router_z_loss_factor · mean over MoE layers of the router z-loss
  (aux_loss_layers='sum' sums over the layers instead, as Mesh TensorFlow and HF).
  Dense models (no MoE layers) have zero aux terms.
  """

  def __init__(self, module: Transformer, z_loss: float = 1e-4, aux_loss_factor: float = 0.01,
               router_z_loss_factor: float = 0.0, label_smoothing: float = 0.0,
               aux_loss_layers: str = "mean"):
    self.module = module
    self.z_loss = z_loss
    self.aux_loss_factor = aux_loss_factor
    self.router_z_loss_factor = router_z_loss_factor
    self.label_smoothing = label_smoothing
    self.aux_loss_layers = aux_loss_layers  # 'mean' or 'sum' over MoE layers (moe_layer.summarize)

  # -- variables ---------------------------------------------------------------------------

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{'params': ...} with flax logical-partitioning boxes (nn.LogicallyPartitioned) on every
    leaf; `flax.core.meta.unbox` gives plain arrays. input_shapes needs encoder_input_tokens and
    decoder_input_tokens (t5x convention; other features are optional)."""
    del input_types  # tokens are int32
    enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
    dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
    variables = self.module.init({"params": rng}, enc, dec, dec, deterministic=True)
    return {"params": variables["params"]}

  # -- loss --------------------------------------------------------------------------------

  @staticmethod
  def _features(batch: Mapping[str, Array]) -> tuple[Array, ...]:
    return (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
            batch.get("decoder_segment_ids"))

  @staticmethod
  def _loss_weights(batch: Mapping[str, Array]) -> Array:
    if batch.get("decoder_loss_weights") is not None:
      return jnp.asarray(batch["decoder_loss_weights"], jnp.float32)
    return (jnp.asarray(batch["decoder_target_tokens"]) > 0).astype(jnp.float32)

  def _apply(self, params: Any, batch: Mapping[str, Array], rng: Array | None
             ) -> tuple[Array, Any]:
    deterministic = rng is None
    rngs = {}
    if rng is not None:
      dropout_rng, router_rng = jax.random.split(rng)
      rngs = {"dropout": dropout_rng, "router": router_rng}
    logits, state = self.module.apply({"params": params}, *self._features(batch),
                                      deterministic=deterministic, rngs=rngs, mutable=["moe"])
    return logits, state.get("moe", {})

  def logits(self, params: Any, batch: Mapping[str, Array]) -> Array:
    """Deterministic teacher-forced logits [b,l,v] float32 (eval capacity factor)."""
    return self._apply(params, batch, None)[0]

  def loss_fn(self, params: Any, batch: Mapping[str, Array], rng: Array | None,
              teacher_logits: Array | None = None, teacher_weight: float = 0.0
              ) -> tuple[Array, dict[str, Array]]:
    """-> (scalar loss, metrics). rng None runs deterministically (no dropout, no jitter, eval
    capacity factor); otherwise it seeds the 'dropout' and 'router' streams.

    teacher_logits [b,l,v] (distillation, moe_jax/distill.py): the cross-entropy term becomes
    (1 - teacher_weight) · xent(targets) + teacher_weight · xent(teacher's token
    probabilities); the metrics add both parts (target_cross_ent_loss, teacher_cross_ent_loss).
    """
    logits, moe_state = self._apply(params, batch, rng)
    targets = jnp.asarray(batch["decoder_target_tokens"])
    weights = self._loss_weights(batch)
    num_tokens = weights.sum()
    denom = jnp.maximum(num_tokens, 1.0)
    cross_ent, z_term = cross_entropy_with_z_loss(logits, targets, self.z_loss,
                                                  self.label_smoothing)
    distill_metrics = {}
    if teacher_logits is not None:
      soft = soft_cross_entropy(logits, teacher_logits)
      distill_metrics = {"target_cross_ent_loss": jnp.sum(cross_ent * weights) / denom,
                         "teacher_cross_ent_loss": jnp.sum(soft * weights) / denom}
      cross_ent = (1.0 - teacher_weight) * cross_ent + teacher_weight * soft
    cross_ent_loss = jnp.sum(cross_ent * weights) / denom
    z_loss = jnp.sum(z_term * weights) / denom
    losses, moe_metrics = moe_layer.summarize(moe_state, self.aux_loss_layers)
    aux_loss = self.aux_loss_factor * losses["load_balance_loss"]
    router_z_loss = self.router_z_loss_factor * losses["router_z_loss"]
    loss = cross_ent_loss + z_loss + aux_loss + router_z_loss
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
    metrics = {"loss": loss, "cross_ent_loss": cross_ent_loss, "z_loss": z_loss,
               "aux_loss": aux_loss, "router_z_loss": router_z_loss, "accuracy": accuracy,
               "num_tokens": num_tokens, **distill_metrics}
    metrics.update({f"moe/{k}": v for k, v in moe_metrics.items()})
    return loss, metrics

  def eval_fn(self, params: Any, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Deterministic loss and metrics (MoE layers use their eval capacity factor)."""
    return self.loss_fn(params, batch, None)

  # -- inference ---------------------------------------------------------------------------

  def score_batch(self, params: Any, batch: Mapping[str, Array]) -> Array:
    """Log-likelihood of decoder_target_tokens [b] (float32), summed over the loss weights
    (decoder_loss_weights, or the non-padding targets)."""
    logits, _ = self._apply(params, batch, None)
    targets = jnp.asarray(batch["decoder_target_tokens"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_ll * self._loss_weights(batch), axis=-1)

  def _init_cache(self, params: Any, encoded: Array, encoder_tokens: Array,
                  length: int) -> Any:
    """Zeroed decoder cache for batch encoded.shape[0] and `length` decode steps."""
    ids = jnp.zeros((encoded.shape[0], length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: self.module.apply({"params": params}, encoded, encoder_tokens, ids,
                                  deterministic=True, decode=True, mutable=["cache"],
                                  method=Transformer.decode)[1]["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def predict_batch(self, params: Any, batch: Mapping[str, Array], rng: Array | None = None,
                    decode_method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                    beam_size: int = 4, alpha: float = 0.6,
                    max_decode_length: int | None = None) -> Array:
    """Decoded token ids [b, l] int32 (PAD after EOS); l = max_decode_length or the length of
    decoder_input_tokens / decoder_target_tokens in the batch.

    decode_method: 'greedy'; 'sample' (temperature sampling, optionally top-k; needs rng);
    'beam' (beam search with GNMT length penalty `alpha`; returns the best beam).
    """
    sequences, _ = self.predict_batch_with_scores(params, batch, rng, decode_method, temperature,
                                                  top_k, beam_size, alpha, max_decode_length)
    return sequences

  def predict_batch_with_scores(self, params: Any, batch: Mapping[str, Array],
                                rng: Array | None = None, decode_method: str = "greedy",
                                temperature: float = 1.0, top_k: int = 0, beam_size: int = 4,
                                alpha: float = 0.6, max_decode_length: int | None = None
                                ) -> tuple[Array, Array]:
    """Like predict_batch, also returning each sequence's score [b] (log-likelihood; for beam
    search divided by the length penalty)."""
    encoder_tokens = jnp.asarray(batch["encoder_input_tokens"])
    if max_decode_length is None:
      key = ("decoder_input_tokens" if "decoder_input_tokens" in batch
             else "decoder_target_tokens")
      max_decode_length = batch[key].shape[1]
    b = encoder_tokens.shape[0]
    encoded = self.module.apply({"params": params}, encoder_tokens,
                                batch.get("encoder_segment_ids"), deterministic=True,
                                method=Transformer.encode)
    if decode_method == "beam":
      # Every beam gets its own copy of the encoder output and cache rows: [b·k, ...].
      encoded = jnp.repeat(encoded, beam_size, axis=0)
      encoder_tokens = jnp.repeat(encoder_tokens, beam_size, axis=0)
    cache = self._init_cache(params, encoded, encoder_tokens, max_decode_length)

    def tokens_to_logits(ids: Array, cache: Any) -> tuple[Array, Any]:
      logits, state = self.module.apply(
          {"params": params, "cache": cache}, encoded, encoder_tokens, ids, deterministic=True,
          decode=True, max_decode_length=max_decode_length, mutable=["cache"],
          method=Transformer.decode)
      return logits[:, 0], state["cache"]

    if decode_method == "beam":
      seqs, scores = decoding.beam_search(tokens_to_logits, cache, b, beam_size,
                                          max_decode_length, alpha=alpha, eos_id=EOS_ID)
      return seqs[:, 0], scores[:, 0]
    if decode_method == "greedy":
      return decoding.temperature_sample(tokens_to_logits, cache, b, max_decode_length,
                                         rng=None, temperature=0.0, eos_id=EOS_ID)
    if decode_method == "sample":
      if rng is None:
        raise ValueError("decode_method='sample' needs an rng")
      return decoding.temperature_sample(tokens_to_logits, cache, b, max_decode_length,
                                         rng=rng, temperature=temperature, top_k=top_k,
                                         eos_id=EOS_ID)
    raise ValueError(f"decode_method={decode_method!r} is not one of 'greedy', 'sample', 'beam'")


def count_params(variables: Any) -> int:
  """Number of parameters in a (possibly boxed, possibly abstract) variable tree."""
  leaves = jax.tree_util.tree_leaves(flax.core.meta.unbox(variables))
  return int(sum(np.prod(x.shape) for x in leaves))
