"""moe_jax models trained, evaluated, resumed and decoded by t5x itself (`python -m t5x.train`).

This is the only module that imports t5x (an optional extra); gin/t5x/*.gin bind its classes.

- `T5xTransformer`: moe_jax's `models.Transformer` with t5x's module interface (`__call__`,
  `encode`, `decode` with enable_dropout / decode / max_decode_length). It subclasses the
  Transformer without a scope of its own, so its parameter tree is moe_jax's exactly: a moe_jax
  checkpoint's params are the t5x model's params. Every router call also sows t5x.contrib.moe's
  MOE_METRICS into 'intermediates' (see `_sow_t5x_metrics`), where MoeEncoderDecoderModel's
  loss reads them.
- `EncoderDecoderModel` / `MoeEncoderDecoderModel`: t5x's model classes (dense / MoE loss) with
  what moe_jax modules need on top: the 'params_axes' collection t5x's partitioner and
  Adafactor read (moe_jax boxes its params with nn.LogicallyPartitioned instead), a 'router'
  rng stream split off t5x's dropout rng, and decoding caches whose every leaf has a batch
  dimension, as t5x's beam search expects.
- `<task>_eval` seqio tasks: each of moe_jax's tasks with metric functions (exact-match
  sequence accuracy, mean log-likelihood), which `python -m t5x.eval` needs; moe_jax's own
  tasks carry none (its trainer reports loss and accuracy itself).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as flax_partitioning
import gin
import numpy as np
import seqio
from t5x import models as t5x_models
from t5x.contrib.moe import models as t5x_moe_models

from moe_jax import data
from moe_jax import models
from moe_jax import routing

Array = jax.Array
PyTree = Any

# moe_jax's scalar decode counters in the 'cache' collection (Decoder, MoeLayer).
_STEP_COUNTER = "position"


def _sow_t5x_metrics(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
  """flax method interceptor: after a router's __call__, sow one value per MoE layer of each
  of t5x.contrib.moe.models.MOE_METRICS into 'intermediates' (a no-op unless the caller made
  that collection mutable). Definitions as flaxformer's MoeLayer (t5x's reference):
    auxiliary_loss, router_z_loss: the layer's unweighted load-balance and router z-losses;
    fraction_tokens_left_behind: real tokens that no expert took;
    expert_usage: assignments kept / (E · C · G), the share of expert slots filled;
    router_confidence: mean combine weight of the kept assignments."""
  out = next_fun(*args, **kwargs)
  module = context.module
  if not (isinstance(module, routing.Router) and context.method_name == "__call__"):
    return out  # any other module's method
  decision: routing.RouterOutput = out
  g, _, _ = decision.kept.shape
  kept = decision.kept.astype(jnp.float32)  # [g,s,k]
  num_kept = kept.sum()
  slots = module.num_experts * kwargs["capacity"] * g
  for name, value in (
      ("auxiliary_loss", decision.load_balance_loss),
      ("router_z_loss", decision.router_z_loss),
      ("fraction_tokens_left_behind", decision.metrics["fraction_dropped"]),
      ("expert_usage", num_kept / slots),
      ("router_confidence", decision.gate.sum() / jnp.maximum(num_kept, 1.0))):
    module.sow("intermediates", name, value)
  return decision


class T5xTransformer(models.Transformer):
  """moe_jax's Transformer with t5x's module interface (what t5x's EncoderDecoderModel calls).

  enable_dropout=True is moe_jax's deterministic=False: dropout, router jitter (from the
  'router' rng stream) and the MoE layers' train capacity factor. *_positions are accepted
  and ignored (relative position biases; packed rows are separated by *_segment_ids).
  """

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, *, enable_dropout: bool = True) -> Array:
    """[b,le] -> encoded [b,le,m]."""
    del encoder_positions
    with nn.intercept_methods(_sow_t5x_metrics):
      return super().encode(encoder_input_tokens, encoder_segment_ids,
                            deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array | None = None,
             encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None, *, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """-> logits [b,ld,v] float32; with decode=True one cached step (see models.Decoder)."""
    del decoder_positions
    with nn.intercept_methods(_sow_t5x_metrics):
      return super().decode(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                            deterministic=not enable_dropout, decode=decode,
                            max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Teacher-forced logits [b,ld,v] float32; decode=True creates the decoding cache."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)


@gin.configurable
def t5x_module(transformer: models.Transformer) -> T5xTransformer:
  """The t5x-interface module of a moe_jax Transformer (gin: the model gin's
  `@models.Transformer()`), same config and MoE layer templates."""
  return T5xTransformer(config=transformer.config, encoder_moe=transformer.encoder_moe,
                        decoder_moe=transformer.decoder_moe)


def params_axes(boxed_params: PyTree) -> PyTree:
  """nn.LogicallyPartitioned params -> t5x's 'params_axes' collection: `<name>_axes` ->
  AxisMetadata(logical names), as flax's param_with_axes records them."""
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(boxed_params),
      is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  missing = [k for k, v in flat.items() if not isinstance(v, nn.LogicallyPartitioned)]
  if missing:
    raise ValueError(f"param {'/'.join(missing[0])} has no logical axis names "
                     "(nn.with_logical_partitioning), which t5x needs to partition it")
  return flax.traverse_util.unflatten_dict(
      {(*k[:-1], f"{k[-1]}_axes"): flax_partitioning.AxisMetadata(names=tuple(v.names))
       for k, v in flat.items()})


def _batched_counters(cache: PyTree, batch: int) -> PyTree:
  """Scalar step counters -> [batch] copies, so t5x's decoding can expand and gather every
  cache leaf along the batch (beams: batch·beams rows)."""
  return _map_counters(cache, lambda x: jnp.broadcast_to(x, (batch,)))


def _map_counters(cache: PyTree, fn) -> PyTree:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(cache))
  return flax.traverse_util.unflatten_dict(
      {k: fn(v) if k[-1] == _STEP_COUNTER else v for k, v in flat.items()})


class _BridgeMixin:
  """What moe_jax modules need in t5x's EncoderDecoderModel (see the module docstring)."""

  module: T5xTransformer

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Any],
                            input_types: Mapping[str, Any] | None = None) -> PyTree:
    """{'params': plain arrays, 'params_axes': their logical names}; the init's other
    collections (sown losses and metrics) are dropped, so they never become train state.
    Features without an input type are int32 (t5x's default, float32, cannot index the
    embedding)."""
    input_types = {**{k: jnp.int32 for k in input_shapes}, **(input_types or {})}
    variables = super().get_initial_variables(rng, input_shapes, input_types)
    boxed = variables["params"]
    return flax.core.freeze({"params": nn.unbox(boxed), "params_axes": params_axes(boxed)})

  def _compute_logits(self, params: PyTree, batch: Mapping[str, Array],
                      dropout_rng: Array | None = None, mutable: Any = False,
                      other_variables: PyTree | None = None):
    """t5x's forward pass; the dropout rng is split into moe_jax's 'dropout' and 'router'
    (jitter) streams exactly as moe_jax's own EncoderDecoderModel splits its step rng."""
    rngs = None
    if dropout_rng is not None:
      dropout, router = jax.random.split(dropout_rng)
      rngs = {"dropout": dropout, "router": router}
    return self.module.apply(
        {"params": params, **(other_variables or {})},
        batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        decode=False, enable_dropout=rngs is not None, rngs=rngs, mutable=mutable)

  def _compute_kv_cache(self, params: PyTree, encoded_inputs: Array,
                        encoder_input_tokens: Array, decoder_input_tokens: Array,
                        prefill_decoder_prompt: bool = False):
    cache, index = super()._compute_kv_cache(params, encoded_inputs, encoder_input_tokens,
                                             decoder_input_tokens, prefill_decoder_prompt)
    return _batched_counters(cache, encoder_input_tokens.shape[0]), index

  def _compute_logits_from_slice(self, decoding_state, params: PyTree, encoded_inputs: Array,
                                 raw_inputs: Array, max_decode_length: int):
    # Every row holds the same step counter: the module takes it as the scalar it made.
    scalar_cache = _map_counters(decoding_state.cache, lambda x: x[0])
    logits, cache = super()._compute_logits_from_slice(
        decoding_state.replace(cache=scalar_cache), params, encoded_inputs, raw_inputs,
        max_decode_length)
    return logits, _batched_counters(cache, decoding_state.cur_token.shape[0])


@gin.configurable
class EncoderDecoderModel(_BridgeMixin, t5x_models.EncoderDecoderModel):
  """t5x's EncoderDecoderModel over a moe_jax T5xTransformer (dense models: no MoE losses)."""


@gin.configurable
class MoeEncoderDecoderModel(_BridgeMixin, t5x_moe_models.MoeEncoderDecoderModel):
  """t5x.contrib.moe's MoeEncoderDecoderModel over a moe_jax T5xTransformer: its loss adds
  aux_loss_factor · (mean over MoE layers of the load-balance loss) and router_z_loss_factor ·
  (mean of the router z-losses), as moe_jax's EncoderDecoderModel with aux_loss_layers='mean'."""


# ---- seqio tasks with metrics, for t5x.eval ---------------------------------------------------

EVAL_SUFFIX = "_eval"


def sequence_accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """Percent of examples whose decoded prediction equals the target text exactly."""
  return {"sequence_accuracy": 100.0 * float(np.mean([t == p for t, p in
                                                      zip(targets, predictions)]))}


def mean_log_likelihood(targets: list[str], scores: list[float]) -> dict[str, float]:
  """Mean over examples of the target's log-likelihood (nats, summed over its tokens)."""
  del targets
  return {"mean_log_likelihood": float(np.mean(scores))}


def register_eval_task(name: str) -> str:
  """Registers `<name>_eval`: seqio task `name` (same source, preprocessors, features) with
  sequence_accuracy and mean_log_likelihood as metrics. Returns the new task's name."""
  task = seqio.get_mixture_or_task(name)
  eval_name = name + EVAL_SUFFIX
  seqio.TaskRegistry.remove(eval_name)  # re-importing replaces it
  seqio.TaskRegistry.add(eval_name, source=task.source, preprocessors=task.preprocessors,
                         output_features=task.output_features,
                         metric_fns=[sequence_accuracy, mean_log_likelihood])
  return eval_name


def _register_eval_tasks() -> None:
  """An `_eval` twin for every registered task on moe_jax's vocabulary without metrics."""
  for name in list(seqio.TaskRegistry.names()):
    task = seqio.get_mixture_or_task(name)
    vocabulary = task.output_features["targets"].vocabulary
    if (isinstance(vocabulary, data.ConfiguredVocabulary) and not task.metric_fns
        and not name.endswith(EVAL_SUFFIX)):
      register_eval_task(name)


_register_eval_tasks()
