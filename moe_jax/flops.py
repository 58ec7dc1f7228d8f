"""Model FLOPs of a training step: the numerator of MFU (model FLOPs utilization).

Counted as PaLM's appendix B counts them: the matmuls the model needs, 2 FLOPs per multiply-add
in the forward pass and twice that in the backward (so 6 per weight per token), plus the
attention scores and the weighted sum of values at full (unmasked) length. An MoE layer counts
its router and each token's active experts: k per token (tokens choose), the training
capacity factor per token (experts choose). Capacity slots left empty, dispatch and combine
einsums, softmaxes and norms are the implementation's cost, not the model's, so they are not
counted; the embedding lookup is a gather. Units: FLOPs (not per second).
"""
from __future__ import annotations

from moe_jax import models, moe_layer, routing


def _mlp_flops(d_model: int, d_ff: int, activations: int) -> int:
  """Forward FLOPs of one token through a feed-forward: `activations` input matrices [m,h]
  (2 when gated) and the output matrix [h,m]."""
  return 2 * (activations + 1) * d_model * d_ff


def _ffn_flops(config: models.T5Config, moe: moe_layer.MoeLayer | None) -> float:
  """Forward FLOPs per token of a layer's feed-forward: dense, or router + active experts."""
  if moe is None:
    return _mlp_flops(config.emb_dim, config.mlp_dim, len(config.activations))
  per_token = (moe.train_capacity_factor if isinstance(moe.router, routing.ExpertsChooseRouter)
               else moe.router.capacity_k)
  return (2 * config.emb_dim * moe.num_experts
          + per_token * _mlp_flops(config.emb_dim, moe.d_ff, len(moe.activations)))


def train_step_flops(model: models.EncoderDecoderModel, batch_size: int, inputs_length: int,
                     targets_length: int) -> float:
  """Model FLOPs of one training step (forward + backward) on `batch_size` sequences of
  `inputs_length` encoder and `targets_length` decoder tokens."""
  module = model.module
  c = module.config
  inner = c.num_heads * c.head_dim
  projection = 2 * c.emb_dim * inner  # one of q, k, v, o per token
  enc, dec = inputs_length, targets_length

  def attention(keys: int) -> int:  # per query token: q·k scores and the sum of values
    return 2 * 2 * keys * inner

  def ffn(moe: moe_layer.MoeLayer | None, sparse_step: int, i: int) -> float:
    return _ffn_flops(c, moe if models.is_sparse_layer(i, sparse_step) else None)

  encoder = sum(4 * projection + attention(enc) + ffn(module.encoder_moe, c.encoder_sparse_step, i)
                for i in range(c.num_encoder_layers)) * enc
  decoder = sum((4 * projection + attention(dec)  # self-attention
                 + 2 * projection + attention(enc)  # cross-attention: q, o and the scores
                 + ffn(module.decoder_moe, c.decoder_sparse_step, i)) * dec
                + 2 * projection * enc  # cross-attention keys and values of the encoder output
                for i in range(c.num_decoder_layers))
  logits = 2 * c.emb_dim * c.vocab_size * dec
  return 3.0 * batch_size * (encoder + decoder + logits)
