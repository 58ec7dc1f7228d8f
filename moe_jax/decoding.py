"""Autoregressive decoding with an attention cache: greedy / temperature (top-k) sampling and
beam search.

Both take `tokens_to_logits(ids [n,1] int32, cache) -> (logits [n,v] float32, new cache)`, which
runs one decoder step with decode=True. Sequences start from the start token (bos_id = PAD = 0)
and are returned without it, [.., L] int32, with PAD after EOS. Cache leaves with a leading
batch axis ([n, ...]) are reordered with the beams; scalar leaves (cache indices) are shared.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
TokensToLogits = Callable[[Array, Any], tuple[Array, Any]]

NEG_INF = -1.0e7  # finite, so "no candidate" scores stay ordered and never produce NaN


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int,
                       max_decode_length: int, rng: Array | None = None,
                       temperature: float = 1.0, top_k: int = 0, eos_id: int = 1,
                       bos_id: int = 0) -> tuple[Array, Array]:
  """Greedy (temperature 0) or sampled decoding.

  Draws token_t ~ softmax(logits_t / temperature), restricted to the top_k logits when
  top_k > 0; a sequence stops after its EOS. Returns (sequences [b,L] int32, log-likelihood [b]
  float32 of the emitted tokens under the model, i.e. before temperature).
  """
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError("sampling needs an rng")
  b, length = batch_size, max_decode_length

  def body(state):
    i, seqs, prev, done, score, cache, key = state
    logits, cache = tokens_to_logits(prev[:, None], cache)  # [b,v]
    if greedy:
      token = jnp.argmax(logits, axis=-1)
    else:
      key, sub = jax.random.split(key)
      scaled = logits / temperature
      if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
      token = jax.random.categorical(sub, scaled, axis=-1)
    token = jnp.where(done, 0, token).astype(jnp.int32)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, log_p)
    seqs = seqs.at[:, i].set(token)
    done = done | (token == eos_id)
    return i + 1, seqs, token, done, score, cache, key

  def cond(state):
    i, _, _, done, *_ = state
    return (i < length) & ~jnp.all(done)

  init = (jnp.array(0), jnp.zeros((b, length), jnp.int32), jnp.full((b,), bos_id, jnp.int32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), cache,
          jax.random.key(0) if rng is None else rng)
  _, seqs, _, _, score, _, _ = jax.lax.while_loop(cond, body, init)
  return seqs, score


def length_penalty(length: Array | int, alpha: float) -> Array:
  """GNMT length penalty ((5 + length) / 6)^alpha; 1 for alpha = 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: Any, beam_index: Array, batch_size: int, old_beams: int) -> Any:
  """Reorder the [b·k_old, ...] leaves of `tree` by beam_index [b, k_new] -> [b·k_new, ...]."""
  def gather(x):
    if x.ndim == 0:
      return x
    x = x.reshape((batch_size, old_beams) + x.shape[1:])
    idx = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
    x = jnp.take_along_axis(x, idx, axis=1)
    return x.reshape((-1,) + x.shape[2:])
  return jax.tree_util.tree_map(gather, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int, beam_size: int,
                max_decode_length: int, alpha: float = 0.6, eos_id: int = 1,
                bos_id: int = 0) -> tuple[Array, Array]:
  """Beam search. `cache` (and whatever tokens_to_logits closes over) must already hold
  batch_size · beam_size rows, beam-major within each example.

  Each step extends every live beam by every token and keeps the 2k best candidates: those
  ending in EOS that rank among the best k become finished hypotheses (score = log-likelihood /
  length_penalty(length, alpha)), the best k others stay live. At the last step every candidate
  among the best k is finished. The search stops early once no live beam can beat the k-th
  finished score. With k = 1 and alpha = 0 this is greedy decoding.

  Returns (sequences [b,k,L] int32, scores [b,k] float32), best first.
  """
  b, k, length = batch_size, beam_size, max_decode_length
  max_penalty = length_penalty(length, alpha)

  def body(state):
    i, live_seqs, live_logp, fin_seqs, fin_scores, cache = state
    prev = jnp.where(i == 0, bos_id, live_seqs[:, :, jnp.maximum(i - 1, 0)])  # [b,k]
    logits, cache = tokens_to_logits(prev.reshape(b * k, 1).astype(jnp.int32), cache)
    v = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v)
    candidates = (live_logp[:, :, None] + log_p).reshape(b, k * v)
    cand_logp, flat = jax.lax.top_k(candidates, 2 * k)  # [b,2k], best first
    origin = flat // v
    token = (flat % v).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(live_seqs, origin[:, :, None], axis=1)
    cand_seqs = cand_seqs.at[:, :, i].set(token)

    is_eos = token == eos_id
    in_top_k = jnp.arange(2 * k) < k
    finishing = in_top_k & (is_eos | (i == length - 1))
    new_scores = jnp.where(finishing, cand_logp / length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)

    live_scores = jnp.where(is_eos, NEG_INF, cand_logp)
    live_logp, keep = jax.lax.top_k(live_scores, k)
    live_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(origin, keep, axis=1), b, k)
    return i + 1, live_seqs, live_logp, fin_seqs, fin_scores, cache

  def cond(state):
    i, _, live_logp, _, fin_scores, _ = state
    # Log-likelihoods only fall and the penalty only grows, so live_logp / max_penalty bounds
    # every score a live beam can still reach.
    can_improve = live_logp[:, 0] / max_penalty > fin_scores[:, -1]
    return (i < length) & jnp.any(can_improve)

  live_logp = jnp.concatenate([jnp.zeros((b, 1)), jnp.full((b, k - 1), NEG_INF)], axis=1)
  init = (jnp.array(0), jnp.zeros((b, k, length), jnp.int32), live_logp,
          jnp.zeros((b, k, length), jnp.int32), jnp.full((b, k), NEG_INF), cache)
  _, _, _, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, init)
  return fin_seqs, fin_scores
