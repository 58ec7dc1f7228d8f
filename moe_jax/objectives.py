"""T5's pre-training objectives as seqio preprocessors (TF ops): span corruption and prefix LM.

Both read a tokenized 'targets' feature (one document per example) and run after the cache
point, before seqio's append_eos_after_trim; data.py's tasks pick one by name (OBJECTIVES).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import moe_jax

tf = moe_jax.import_tensorflow()
import seqio  # noqa: E402  pylint: disable=wrong-import-position

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
_MAX_CHUNK_TOKENS = 65536  # T5's select_random_chunk bound on one document
_CONCAT_BATCH = 128  # documents concatenated before splitting (T5's reduce_concat_tokens)


def random_spans_helper(inputs_length: int, noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(tokens_length, targets_length) for span corruption with inputs of inputs_length tokens.

  tokens_length is the longest raw segment whose corrupted inputs (non-noise tokens + one
  sentinel per noise span + EOS) fit in inputs_length; targets_length is the matching targets
  length (noise tokens + one sentinel per span + EOS). T5: 512 -> (568, 114).
  """
  def lengths(tokens: int) -> tuple[int, int]:
    noise = int(round(tokens * noise_density))
    spans = int(round(noise / mean_noise_span_length))
    return tokens - noise + spans + 1, noise + spans + 1

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """int32 [num_segments]: lengths (each >= 1) of a uniformly random split of num_items items."""
  # Cut after a random (num_segments - 1)-subset of the num_items - 1 inner boundaries.
  boundaries = seqio.utils.stateless_shuffle(tf.range(1, num_items), seed)
  cuts = tf.sort(boundaries[:num_segments - 1])
  edges = tf.concat([[0], cuts, [num_items]], axis=0)
  return edges[1:] - edges[:-1]


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds: Sequence[tf.Tensor],
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.Tensor:
  """bool [length]: T5's noise mask; True marks the noise (masked-out) tokens.

  round(length * noise_density) noise tokens (at least 1, at most length - 1) in
  round(noise / mean_noise_span_length) spans (at least 1); the sequence alternates a
  non-noise span and a noise span, starting with non-noise. Span lengths of each kind are a
  uniformly random composition (seeds[0] for noise, seeds[1] for non-noise).
  """
  full_length = length
  length = tf.maximum(length, 2)  # a mask needs one token of each kind
  num_noise = tf.clip_by_value(
      tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32), 1, length - 1)
  num_spans = tf.maximum(
      tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32), 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  clean_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([clean_lengths, noise_lengths], axis=1), [-1])  # clean first
  span_index = tf.repeat(tf.range(2 * num_spans), span_lengths)
  return tf.equal(span_index % 2, 1)[:full_length]


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                  vocabulary: seqio.Vocabulary) -> tf.Tensor:
  """Replaces each noise span by one sentinel: vocab_size - 1, vocab_size - 2, ... in order."""
  prev_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  span_start = noise_mask & ~prev_noise
  sentinels = vocabulary.vocab_size - tf.cumsum(tf.cast(span_start, tokens.dtype))
  return tf.boolean_mask(tf.where(span_start, sentinels, tokens), ~(noise_mask & prev_noise))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                     vocabulary: seqio.Vocabulary) -> tf.Tensor:
  """The targets side: each non-noise span becomes a sentinel, noise tokens stay."""
  return noise_span_to_unique_sentinel(tokens, ~noise_mask, vocabulary)


@seqio.map_over_dataset(num_seeds=1)
def _select_random_chunk(features: Mapping[str, tf.Tensor], seed: tf.Tensor,
                         max_length: int) -> dict[str, tf.Tensor]:
  """Keeps 'targets' only: one random max_length-token chunk of a longer document."""
  tokens = features["targets"]
  num_chunks = tf.maximum((tf.size(tokens) + max_length - 1) // max_length, 1)
  start = tf.random.stateless_uniform([], seed, 0, num_chunks, tf.int32) * max_length
  return {"targets": tokens[start:start + max_length]}


def _split_tokens(dataset: tf.data.Dataset, max_tokens: int) -> tf.data.Dataset:
  """Splits each 'targets' into consecutive pieces of max_tokens (the last may be shorter)."""
  def split(features):
    tokens = features["targets"]
    n = tf.size(tokens)
    num_pieces = (n + max_tokens - 1) // max_tokens
    piece_lengths = tf.minimum(max_tokens, n - tf.range(num_pieces) * max_tokens)
    pieces = tf.RaggedTensor.from_row_lengths(tokens, piece_lengths)
    return tf.data.Dataset.from_tensor_slices({"targets": pieces})
  return dataset.flat_map(split)


def _concat_and_split(dataset: tf.data.Dataset, max_tokens: int) -> tf.data.Dataset:
  """Concatenates _CONCAT_BATCH documents (no separator, as T5) and splits into pieces."""
  batched = dataset.map(lambda f: f["targets"]).padded_batch(_CONCAT_BATCH, padded_shapes=[None])
  # 0 is PAD and never a real token, so dropping zeros drops exactly the padding.
  concatenated = batched.map(lambda b: {"targets": tf.boolean_mask(b, tf.not_equal(b, 0))})
  return _split_tokens(concatenated, max_tokens)


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(features: Mapping[str, tf.Tensor], seeds: Sequence[tf.Tensor],
                   noise_density: float, mean_noise_span_length: float,
                   vocabulary: seqio.Vocabulary) -> dict[str, tf.Tensor]:
  tokens = features["targets"]
  mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds, mean_noise_span_length)
  return {"inputs": noise_span_to_unique_sentinel(tokens, mask, vocabulary),
          "targets": nonnoise_span_to_unique_sentinel(tokens, mask, vocabulary)}


def _non_empty(features: Mapping[str, tf.Tensor]) -> tf.Tensor:
  return tf.size(features["targets"]) > 0


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """T5 span corruption (seqio preprocessor on tokenized 'targets', before append_eos_after_trim).

  Random chunk of each document -> concatenate 128 documents -> split into raw segments sized
  by random_spans_helper(inputs length) -> noise mask -> inputs: non-noise tokens with one
  sentinel per noise span; targets: each noise span preceded by its sentinel.
  """
  if not sequence_length or "inputs" not in sequence_length:
    raise ValueError("span_corruption needs sequence_length['inputs']")
  vocabulary = output_features["targets"].vocabulary
  tokens_length, _ = random_spans_helper(sequence_length["inputs"], noise_density,
                                         mean_noise_span_length)
  max_spans = max(round(round(tokens_length * noise_density) / mean_noise_span_length), 1)
  if max_spans > vocabulary.extra_ids:
    raise ValueError(f"sequence_length['inputs']={sequence_length['inputs']} gives up to "
                     f"{max_spans} noise spans but the vocabulary has only "
                     f"extra_ids={vocabulary.extra_ids} sentinels")
  ds = _select_random_chunk(dataset.filter(_non_empty), max_length=_MAX_CHUNK_TOKENS)
  ds = _concat_and_split(ds, tokens_length)
  return _corrupt_spans(ds, noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length, vocabulary=vocabulary)


@seqio.map_over_dataset(num_seeds=1)
def _split_at_random_point(features: Mapping[str, tf.Tensor],
                           seed: tf.Tensor) -> dict[str, tf.Tensor]:
  tokens = features["targets"]
  # Uniform in [1, n - 1]: both sides non-empty.
  point = tf.random.stateless_uniform([], seed, 1, tf.size(tokens), tf.int32)
  return {"inputs": tokens[:point], "targets": tokens[point:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """T5 prefix LM (seqio preprocessor): each document is cut into segments of inputs length - 1
  tokens; each segment is split at a uniform random point: inputs = prefix, targets = the rest.

  output_features is unused; seqio passes it to every preprocessor that names it.
  """
  del output_features
  if not sequence_length or "inputs" not in sequence_length:
    raise ValueError("prefix_lm needs sequence_length['inputs']")
  ds = _select_random_chunk(dataset.filter(_non_empty), max_length=_MAX_CHUNK_TOKENS)
  ds = _split_tokens(ds, sequence_length["inputs"] - 1)
  return _split_at_random_point(ds.filter(lambda f: tf.size(f["targets"]) >= 2))


OBJECTIVES = {"span_corruption": span_corruption, "prefix_lm": prefix_lm}
