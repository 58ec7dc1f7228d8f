"""Cached decoding: equal to full-sequence logits; greedy, sampling and beam search against
brute force over the full (uncached) model."""
import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding
from moe_jax import models
from moe_jax import moe_layer
from moe_jax import routing

EOS = 1


def make_model(vocab, sparse_step):
  cfg = models.T5Config(vocab_size=vocab, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                        num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1,
                        encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
                        relative_attention_num_buckets=8, relative_attention_max_distance=12)

  # Eval capacity never binds, so routing one token per step equals routing the sequence.
  moe = moe_layer.MoeLayer(num_experts=4, d_ff=24, eval_capacity_factor=16.0,
                           router=routing.TokensChooseRouter(num_experts=4))
  return models.EncoderDecoderModel(models.Transformer(cfg, moe, moe))


def random_params(model, b, le, ld, seed=0, scale=0.5):
  """Params drawn with NumPy on the abstract tree (real initializers compile slowly on CPU)."""
  shapes = {"encoder_input_tokens": (b, le), "decoder_input_tokens": (b, ld)}
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: (1 + 0.1 * rng.normal(size=x.shape) if x.ndim == 1
                 else scale * rng.normal(size=x.shape)).astype(np.float32),
      flax.core.meta.unbox(abstract)["params"])


@functools.cache
def setup(vocab=12, sparse_step=2, b=2, le=5, ld=6, seed=0):
  model = make_model(vocab, sparse_step)
  params = random_params(model, b, le, ld, seed)
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (b, le)).astype(np.int32)
  enc[-1, -1] = 0  # some encoder padding
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((b, ld), np.int32)}

  @jax.jit
  def full_logits(params, enc, dec_in):
    # Targets only serve as the padding mask: every decoder position is real here.
    return model.module.apply({"params": params}, enc, dec_in, jnp.ones_like(dec_in),
                              deterministic=True)
  return model, params, batch, full_logits


@pytest.mark.parametrize("sparse_step", [0, 1])
def test_cached_decoding_equals_full_sequence_logits(sparse_step):
  model, params, batch, full_logits = setup(sparse_step=sparse_step)
  enc = batch["encoder_input_tokens"]
  b, ld = batch["decoder_input_tokens"].shape
  # Real continuations: no PAD or EOS after the start token (a row that fed one is finished).
  dec_in = np.random.default_rng(1).integers(2, 12, (b, ld)).astype(np.int32)
  dec_in[:, 0] = 0
  expected = np.asarray(full_logits(params, enc, dec_in))

  encoded = model.module.apply({"params": params}, enc, deterministic=True,
                               method=models.Transformer.encode)
  cache = model._init_cache(params, encoded, enc, ld)

  @jax.jit
  def step(cache, ids):
    logits, state = model.module.apply(
        {"params": params, "cache": cache}, encoded, enc, ids, deterministic=True, decode=True,
        max_decode_length=ld, mutable=["cache"], method=models.Transformer.decode)
    return logits[:, 0], state["cache"]

  for t in range(ld):
    logits, cache = step(cache, dec_in[:, t:t + 1])
    np.testing.assert_allclose(logits, expected[:, t], rtol=1e-4, atol=1e-4)


def _full_greedy(params, batch, full_logits, length):
  """Greedy decoding by re-running the whole uncached model on each prefix."""
  b = batch["encoder_input_tokens"].shape[0]
  out = np.zeros((b, length), np.int32)
  done = np.zeros(b, bool)
  for t in range(length):
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), out[:, :-1]], axis=1)
    logits = np.asarray(full_logits(params, batch["encoder_input_tokens"], dec_in))
    out[:, t] = np.where(done, 0, logits[:, t].argmax(-1))
    done |= out[:, t] == EOS
  return out


def test_greedy_equals_argmax_of_full_model():
  model, params, batch, full_logits = setup()
  seqs = np.asarray(model.predict_batch(params, batch, decode_method="greedy"))
  np.testing.assert_array_equal(seqs, _full_greedy(params, batch, full_logits, 6))


def test_beam_size_one_equals_greedy():
  model, params, batch, _ = setup()
  greedy, g_score = model.predict_batch_with_scores(params, batch, decode_method="greedy")
  beam, b_score = model.predict_batch_with_scores(params, batch, decode_method="beam",
                                                  beam_size=1, alpha=0.0)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(b_score, g_score, rtol=1e-5)


def test_top_k_one_sampling_is_greedy():
  model, params, batch, _ = setup()
  greedy = model.predict_batch(params, batch, decode_method="greedy")
  sampled = model.predict_batch(params, batch, rng=jax.random.key(3), decode_method="sample",
                                temperature=2.0, top_k=1)
  np.testing.assert_array_equal(sampled, greedy)


def test_sampling_stays_in_top_k_and_pads_after_eos():
  model, params, batch, full_logits = setup(vocab=12, b=8, le=3, ld=6, seed=4)
  seqs = np.asarray(model.predict_batch(params, batch, rng=jax.random.key(0),
                                        decode_method="sample", temperature=1.5, top_k=3))
  again = model.predict_batch(params, batch, rng=jax.random.key(0), decode_method="sample",
                              temperature=1.5, top_k=3)
  np.testing.assert_array_equal(seqs, again)  # same rng, same draw
  b = seqs.shape[0]
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), seqs[:, :-1]], axis=1)
  logits = np.asarray(full_logits(params, batch["encoder_input_tokens"], dec_in))
  for i in range(b):
    ended = False
    for t in range(seqs.shape[1]):
      if ended:
        assert seqs[i, t] == 0
        continue
      assert seqs[i, t] in np.argsort(logits[i, t])[-3:]
      ended = seqs[i, t] == EOS


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_finds_brute_force_best(alpha):
  vocab, length = 4, 3
  model, params, batch, full_logits = setup(vocab=vocab, b=1, le=4, ld=length, seed=2)
  # Every token sequence, cut after its first EOS: the hypotheses of a search of this length.
  hyps = sorted({tuple(s[:s.index(EOS) + 1]) if EOS in s else s
                 for s in itertools.product(range(vocab), repeat=length)})
  padded = np.array([list(h) + [0] * (length - len(h)) for h in hyps], np.int32)
  dec_in = np.concatenate([np.zeros((len(hyps), 1), np.int32), padded[:, :-1]], axis=1)
  enc = np.repeat(batch["encoder_input_tokens"], len(hyps), axis=0)
  log_p = jax.nn.log_softmax(np.asarray(full_logits(params, enc, dec_in), np.float64))
  scores = [sum(log_p[i, t, h[t]] for t in range(len(h))) / ((5 + len(h)) / 6) ** alpha
            for i, h in enumerate(hyps)]
  best = int(np.argmax(scores))

  # A beam as wide as the number of sequences keeps every hypothesis: the search is exhaustive.
  seqs, beam_scores = model.predict_batch_with_scores(params, batch, decode_method="beam",
                                                      beam_size=vocab ** length, alpha=alpha)
  np.testing.assert_array_equal(seqs[0], padded[best])
  np.testing.assert_allclose(beam_scores[0], scores[best], rtol=1e-4)
  # A narrow beam still returns a hypothesis with its exact score.
  seqs, beam_scores = model.predict_batch_with_scores(params, batch, decode_method="beam",
                                                      beam_size=2, alpha=alpha)
  index = [i for i, p in enumerate(padded) if np.array_equal(p, np.asarray(seqs[0]))]
  assert len(index) == 1
  np.testing.assert_allclose(beam_scores[0], scores[index[0]], rtol=1e-4)


def test_beam_search_returns_hypotheses_sorted():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.4]]))  # pad, EOS, token 2 — fixed every step

  def tokens_to_logits(ids, cache):
    return jnp.broadcast_to(logits, (ids.shape[0], 3)), cache

  seqs, scores = decoding.beam_search(tokens_to_logits, {}, batch_size=1, beam_size=3,
                                      max_decode_length=3, alpha=0.0)
  # EOS at once (0.5), then [2, EOS] (0.4 · 0.5), then [2, 2, EOS] (0.4 · 0.4 · 0.5).
  np.testing.assert_array_equal(seqs[0], [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
  np.testing.assert_allclose(scores[0], np.log([0.5, 0.2, 0.08]), rtol=1e-6)


def test_decoding_rejects_bad_arguments():
  model, params, batch, _ = setup()
  with pytest.raises(ValueError, match="rng"):
    model.predict_batch(params, batch, decode_method="sample")
  with pytest.raises(ValueError, match="decode_method"):
    model.predict_batch(params, batch, decode_method="nucleus")


@pytest.mark.parametrize("grouping", [dict(group_rule="sequence"), dict(group_size=4)])
def test_greedy_equals_teacher_forced_argmax_when_capacity_binds(grouping):
  """With groups inside sequences (one per sequence, or 4-token chunks of 8-token ones) and one
  or two slots per expert, decoding keeps and drops what scoring the decoded sequences does:
  every greedy token is the argmax of the teacher-forced logits at its position."""
  vocab, b, le, ld = 16, 3, 5, 8
  cfg = models.T5Config(vocab_size=vocab, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                        num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0,
                        encoder_sparse_step=1, decoder_sparse_step=1,
                        relative_attention_num_buckets=8, relative_attention_max_distance=12)
  moe = moe_layer.MoeLayer(num_experts=4, d_ff=24, eval_capacity_factor=1.0,
                           min_expert_capacity=1, router=routing.TokensChooseRouter(4),
                           **grouping)
  model = models.EncoderDecoderModel(models.Transformer(cfg, moe, moe))
  params = random_params(model, b, le, ld, seed=2, scale=1.0)
  params["token_embedder"]["embedding"][:2] = 0.0  # PAD and EOS never win: decode every step
  enc = np.random.default_rng(2).integers(2, vocab, (b, le)).astype(np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((b, ld), np.int32)}
  seqs = np.asarray(model.predict_batch(params, batch, decode_method="greedy"))

  dec_in = np.concatenate([np.zeros((b, 1), np.int32), seqs[:, :-1]], axis=1)
  logits, state = model.module.apply({"params": params}, enc, dec_in, seqs, deterministic=True,
                                     mutable=["moe"])
  np.testing.assert_array_equal(np.asarray(logits).argmax(-1), seqs)
  dropped = [float(v[0]) for k, v in flax.traverse_util.flatten_dict(
      state["moe"], sep="/").items() if k.startswith("decoder") and k.endswith("fraction_dropped")]
  assert max(dropped) > 0.1  # capacity binds in the decoder
  assert len(np.unique(seqs)) >= 3  # not a constant output
