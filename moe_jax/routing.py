"""Routers: token representations -> routing decision, auxiliary losses and metrics.

Every router returns a `RouterOutput` in one format, `[g, s, k]` assignments (expert index, slot
in that expert's buffer, gate, kept), so one dispatch code path serves them all. Expert choice
uses k = E (assignment j of a token is "expert j took it or not").

Semantics follow docs/semantics.md ("Routers"): router in float32, priority k-major (all first
choices take capacity before any second choice), Switch combine weight = raw softmax
probability, GShard top-2 with gate normalization and second-expert policies, expert choice.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

CAPACITY_MODES = ("ceil", "flaxformer", "mesh_tf")
SECOND_EXPERT_POLICIES = ("all", "random", "sampling", "none")
LOSS_TOKENS = ("real", "all")
LOAD_BALANCE_CHOICES = ("first", "all")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, *,
                    num_selected_experts: int = 1, min_capacity: int = 1,
                    mode: str = "ceil", multiple_of: int = 1) -> int:
  """Slots per expert per group (C).

  Modes, so each reference implementation's value can be reproduced:
    ceil (default):  ceil(k · cf · S / E)             GShard paper 2S/E at k=2, cf=1
    flaxformer:      round(cf · S / E)                 (no ×k)
    mesh_tf:         min(S, int(S · cf / E))
  then at least `min_capacity`, then rounded up to a multiple of `multiple_of` (Praxis: 4).
  """
  if mode not in CAPACITY_MODES:
    raise ValueError(f"capacity mode={mode!r} is not one of {CAPACITY_MODES}")
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
  s, e = num_tokens, num_experts
  if mode == "ceil":
    # The epsilon keeps float noise (1.1 * 100 / 11 = 10.000000000000002) from adding a slot.
    cap = math.ceil(num_selected_experts * capacity_factor * s / e - 1e-9)
  elif mode == "flaxformer":
    cap = round(capacity_factor * s / e)
  else:
    cap = min(s, int(s * capacity_factor / e))
  cap = max(cap, min_capacity)
  return -(-cap // multiple_of) * multiple_of


@flax.struct.dataclass
class RouterOutput:
  """Routing decision for `[g, s]` tokens with `k` assignments each.

  expert_index: [g, s, k] int32, expert of each assignment.
  slot:         [g, s, k] int32, position in that expert's buffer (meaningful where kept).
  gate:         [g, s, k] float32 combine weight; 0 where not kept.
  kept:         [g, s, k] bool, assignment holds a slot (chosen, active, within capacity).
  load_balance_loss, router_z_loss: float32 scalars (unweighted).
  metrics: dict of float32 scalars and `expert_load` [e].
  fill: [g, e] int32, assignments that competed for each expert's slots (the given
    `fill` plus this call's active ones); what a decode step carries to the next.
  """
  expert_index: Array
  slot: Array
  gate: Array
  kept: Array
  load_balance_loss: Array
  router_z_loss: Array
  metrics: dict[str, Array]
  fill: Array | None = None


def _masked_mean(x: Array, w: Array) -> Array:
  return jnp.sum(x * w) / jnp.maximum(w.sum(), 1.0)


def load_balance_loss(probs: Array, chosen: Array, valid: Array, *,
                      all_tokens: bool = False) -> Array:
  """Switch load-balance loss E · Σ_e f_e · P_e per group, averaged over groups.

  probs [g,s,e]; chosen [g,s,j] int, the experts each token counts in f (its first choice, j=1,
  or all k choices; before capacity); valid [g,s] bool. f_e is the fraction of tokens that chose
  e, P_e the mean router probability. Equals 1 for a uniform top-1 router. Over real tokens:
  padding is left out and groups without real tokens do not count. all_tokens (flaxformer, HF):
  f and P are means over all s slots of every group, padding counted as choosing nothing with
  probability 0.
  """
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  chose = jnp.max(jax.nn.one_hot(chosen, num_experts), axis=-2)  # [g,s,e] each expert once
  n = w.sum(-1)  # [g]
  denom = (jnp.full_like(n, w.shape[-1]) if all_tokens else jnp.maximum(n, 1.0))[:, None]
  f = jnp.einsum("gse,gs->ge", chose, w) / denom
  p = jnp.einsum("gse,gs->ge", probs, w) / denom
  per_group = num_experts * jnp.sum(f * p, axis=-1)
  if all_tokens:
    return jnp.mean(per_group)
  return _masked_mean(per_group, (n > 0).astype(jnp.float32))


def router_z_loss(logits: Array, valid: Array, *, all_tokens: bool = False) -> Array:
  """ST-MoE router z-loss: mean of logsumexp(logits)². logits [g,s,e]; valid [g,s].

  Over real tokens by default; all_tokens (flaxformer) averages over all slots with padding
  logits zeroed, so each padding slot adds log(E)².
  """
  if all_tokens:
    return jnp.mean(jax.nn.logsumexp(jnp.where(valid[..., None], logits, 0.0), axis=-1) ** 2)
  z = jax.nn.logsumexp(logits, axis=-1) ** 2
  return _masked_mean(z, valid.astype(jnp.float32))


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
  """Top-k over the last axis by k rounds of argmax-and-mask. XLA partitions argmax along the
  sharded group axis; lax.top_k it all-gathers. Ties go to the lower index, as in lax.top_k."""
  values, indices = [], []
  for _ in range(k):
    i = jnp.argmax(x, axis=-1)
    values.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
    indices.append(i)
    x = jnp.where(jax.nn.one_hot(i, x.shape[-1], dtype=bool), -jnp.inf, x)
  return jnp.stack(values, -1), jnp.stack(indices, -1).astype(jnp.int32)


def routing_metrics(probs: Array, kept: Array, expert_index: Array, valid: Array) -> dict[str, Array]:
  """Per-layer metrics: fraction of real tokens sent to no expert, load per expert, router
  confidence (mean top-1 probability) and router entropy (nats). probs [g,s,e]; the rest [g,s,k]."""
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  kept_f = kept.astype(jnp.float32)
  routed = jnp.any(kept, axis=-1).astype(jnp.float32)
  per_expert = jnp.einsum("gske,gsk->e", jax.nn.one_hot(expert_index, num_experts), kept_f)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return {
      "fraction_dropped": 1.0 - _masked_mean(routed, w),
      "expert_load": per_expert / jnp.maximum(per_expert.sum(), 1.0),
      "router_confidence": _masked_mean(jnp.max(probs, axis=-1), w),
      "router_entropy": _masked_mean(entropy, w),
  }


JITTER_BITS = 16  # resolution of the jitter: 2ε / 2^16, about 2.5 float32 ulps of 1.0 at ε = 0.01


def jitter(rng: Array, shape: tuple[int, ...], eps: float) -> Array:
  """Multiplicative router jitter U(1-ε, 1+ε) of `shape`, float32, on a grid of 2^16 levels.

  Each 32-bit draw gives two values (its high and low halves): random bits cost as much as a
  small matmul on XLA:CPU (threefry runs as a loop there), and the router's input [g,s,m] needs
  one value per element, so this halves the cost of the jitter in a training step."""
  n = math.prod(shape)
  bits = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
  halves = jnp.concatenate([bits >> JITTER_BITS, bits & (2 ** JITTER_BITS - 1)])[:n]
  u = (halves.astype(jnp.float32) + 0.5) * (2.0 ** -JITTER_BITS)  # (0, 1), centred levels
  return ((1.0 - eps) + (2.0 * eps) * u).reshape(shape)


def _slots(index: Array, active: Array, num_experts: int) -> Array:
  """Slot of each active assignment [g,s,k] in its expert's buffer: its position among the
  assignments to that expert, all first choices first, then the second, ... (token order within
  a choice rank)."""
  g, s, k = index.shape
  onehot = jax.nn.one_hot(index, num_experts, dtype=jnp.int32) * active[..., None]  # [g,s,k,e]
  # [g,s,k,e] -> [g,k,s,e] -> cumsum over (k, s) in k-major order.
  kmajor = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)
  position = jnp.cumsum(kmajor, axis=1) - 1
  position = position.reshape(g, k, s, num_experts).transpose(0, 2, 1, 3)
  return jnp.sum(position * onehot, axis=-1)


class Router(nn.Module):
  """Base router: owns the float32 router weights `w` [m, e] and turns tokens into logits.

  Attributes:
    num_experts: E.
    jitter_noise: ε of the multiplicative input jitter x · U(1-ε, 1+ε), training only, drawn from
      the 'router' rng stream.
    router_init_scale: variance-scaling (fan-in, truncated normal) scale; Switch uses 0.1.
    router_init_std: when set, init the weights N(0, std²) instead (flaxformer: 0.02).
    loss_tokens: 'real' averages the load-balance and z-losses over real tokens; 'all' over
      every slot of every group, padding included (flaxformer, HF).
  """
  num_experts: int
  jitter_noise: float = 0.0
  router_init_scale: float = 0.1
  router_init_std: float | None = None
  loss_tokens: str = "real"

  def __post_init__(self):
    if self.loss_tokens not in LOSS_TOKENS:
      raise ValueError(f"loss_tokens={self.loss_tokens!r} is not one of {LOSS_TOKENS}")
    super().__post_init__()

  # Whether the router may be used where tokens must not see later tokens (decoders).
  causal_safe: ClassVar[bool] = True

  @property
  def capacity_k(self) -> int:
    """k used in the capacity formula."""
    return 1

  @nn.compact
  def router_logits(self, x: Array, deterministic: bool) -> Array:
    """x [g,s,m] -> logits [g,s,e] in float32."""
    x = x.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      x = x * jitter(self.make_rng("router"), x.shape, self.jitter_noise)
    init = (nn.initializers.normal(self.router_init_std) if self.router_init_std is not None
            else nn.initializers.variance_scaling(self.router_init_scale, "fan_in",
                                                  "truncated_normal"))
    w = self.param("w", nn.with_logical_partitioning(init, ("embed", "unmodeled")),
                   (x.shape[-1], self.num_experts), jnp.float32)
    return jnp.einsum("gsm,me->gse", x, jnp.asarray(w, jnp.float32))

  def route(self, logits: Array, valid: Array, capacity: int, deterministic: bool,
            fill: Array | None = None) -> RouterOutput:
    raise NotImplementedError

  def z_loss(self, logits: Array, valid: Array) -> Array:
    return router_z_loss(logits, valid, all_tokens=self.loss_tokens == "all")

  def __call__(self, x: Array, *, capacity: int, valid: Array | None = None,
               deterministic: bool, fill: Array | None = None) -> RouterOutput:
    """x [g,s,m]; valid [g,s] bool marks real (non-padding) tokens; capacity = C. fill [g,e]:
    slots already taken in each group by earlier tokens (cached decoding; tokens choose only)."""
    if valid is None:
      valid = jnp.ones(x.shape[:2], bool)
    return self.route(self.router_logits(x, deterministic), valid, capacity, deterministic,
                      fill)


class TokensChooseRouter(Router):
  """Each token picks its top-k experts (Switch top-1, GShard top-2, general top-k).

  Attributes:
    num_selected_experts: k.
    second_expert_policy: what happens to choices after the first, in training:
      'all' keep them; 'random' keep one when U < gate / second_expert_threshold (GShard's
      "2·p2" is threshold 0.5); 'sampling' draw them from the router distribution with the
      earlier choices masked (Gumbel); 'none' drop them.
    eval_second_expert_policy: the policy when deterministic (default 'all': evaluation stays
      deterministic and needs no rng).
    normalize_gates: divide the gates by their sum over the k choices (GShard). Switch (k=1)
      uses the raw probability.
    normalize_before_drop: normalize over the chosen experts before capacity and policy drop
      them (GShard, Mesh-TF); False normalizes over the kept ones (fairseq, DeepSpeed).
    batch_prioritized: V-MoE batch-prioritized routing: tokens with a higher top-1 probability
      take capacity first. Leaks later tokens' routing, so decoders refuse it.
    load_balance_choices: 'first' counts each token's first choice in the load-balance loss's
      f (Switch paper, GShard); 'all' counts every one of its k choices (flaxformer, HF), about
      k times larger.
  """
  num_selected_experts: int = 1
  second_expert_policy: str = "all"
  second_expert_threshold: float = 0.5
  eval_second_expert_policy: str = "all"
  normalize_gates: bool = False
  normalize_before_drop: bool = True
  batch_prioritized: bool = False
  load_balance_choices: str = "first"

  def __post_init__(self):
    if self.load_balance_choices not in LOAD_BALANCE_CHOICES:
      raise ValueError(f"load_balance_choices={self.load_balance_choices!r} is not one of "
                       f"{LOAD_BALANCE_CHOICES}")
    for name in ("second_expert_policy", "eval_second_expert_policy"):
      if getattr(self, name) not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not one of {SECOND_EXPERT_POLICIES}")
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise ValueError(f"num_selected_experts={self.num_selected_experts} must be in "
                       f"[1, num_experts={self.num_experts}]")
    if self.second_expert_threshold <= 0:
      raise ValueError(f"second_expert_threshold={self.second_expert_threshold} must be > 0")
    super().__post_init__()

  @property
  def causal_safe(self) -> bool:  # type: ignore[override]
    return not self.batch_prioritized

  @property
  def capacity_k(self) -> int:
    return self.num_selected_experts

  def route(self, logits: Array, valid: Array, capacity: int, deterministic: bool,
            fill: Array | None = None) -> RouterOutput:
    g, s, e = logits.shape
    k = self.num_selected_experts
    probs = jax.nn.softmax(logits, axis=-1)
    policy = self.eval_second_expert_policy if deterministic else self.second_expert_policy

    gate, index = _top_k(probs, k)  # [g,s,k]
    first_choice, first_prob = index[..., 0], gate[..., 0]  # [g,s]
    balanced = index if self.load_balance_choices == "all" else index[..., :1]  # before sampling
    if policy == "sampling" and k > 1:
      # Choices 2..k drawn without replacement (Gumbel top-k) with the first expert masked.
      gumbel = jax.random.gumbel(self.make_rng("router"), logits.shape)
      scores = jnp.where(jax.nn.one_hot(first_choice, e, dtype=bool), -jnp.inf, logits + gumbel)
      _, rest = _top_k(scores, k - 1)
      index = jnp.concatenate([index[..., :1], rest], axis=-1)
      gate = jnp.take_along_axis(probs, index, axis=-1)
    if self.normalize_gates and self.normalize_before_drop:
      gate = gate / jnp.sum(gate, axis=-1, keepdims=True)

    active = jnp.broadcast_to(valid[..., None], (g, s, k))
    later = jnp.arange(k) > 0  # [k]: choices the policy governs
    if policy == "none":
      active = active & ~later
    elif policy == "random" and k > 1:
      u = jax.random.uniform(self.make_rng("router"), (g, s, k))
      active = active & (~later | (u < gate / self.second_expert_threshold))

    # Priority: all first choices before any second choice; within a choice rank, token order
    # (or descending top-1 probability with batch-prioritized routing: tokens are permuted into
    # that order and the slots permuted back).
    if self.batch_prioritized:
      order = jnp.argsort(-first_prob, axis=-1, stable=True)  # [g,s]
      take = lambda a: jnp.take_along_axis(a, order[..., None], axis=1)  # noqa: E731  [g,s,k]
      slot = _slots(take(index), take(active), e)
      take_back = jnp.argsort(order, axis=-1)
      slot = jnp.take_along_axis(slot, take_back[..., None], axis=1)
    else:
      slot = _slots(index, active, e)
    competing = jnp.einsum("gske->ge", jax.nn.one_hot(index, e, dtype=jnp.int32)
                           * active[..., None])
    if fill is not None:  # earlier tokens of the group hold the first fill[g, e] slots
      slot = slot + jnp.take_along_axis(fill[:, None, :], index, axis=-1)
      competing = competing + fill
    kept = active & (slot < capacity)

    if self.normalize_gates and not self.normalize_before_drop:
      kept_gate = jnp.where(kept, gate, 0.0)
      gate = kept_gate / jnp.maximum(jnp.sum(kept_gate, axis=-1, keepdims=True), 1e-9)
    gate = jnp.where(kept, gate, 0.0)

    return RouterOutput(
        expert_index=index, slot=slot, gate=gate, kept=kept,
        load_balance_loss=load_balance_loss(probs, balanced, valid,
                                            all_tokens=self.loss_tokens == "all"),
        router_z_loss=self.z_loss(logits, valid),
        metrics=routing_metrics(probs, kept, index, valid), fill=competing)


class ExpertsChooseRouter(Router):
  """Expert choice (Zhou et al. 2022): each expert takes the top-C tokens of the group by
  router probability; a token may get 0..E experts. No load-balance loss (it is balanced by
  construction; reported as 0). Sees the whole group, so decoders refuse it."""
  causal_safe: ClassVar[bool] = False

  def route(self, logits: Array, valid: Array, capacity: int, deterministic: bool,
            fill: Array | None = None) -> RouterOutput:
    del fill  # never decodes (causal_safe is False)
    g, s, e = logits.shape
    if capacity > s:
      raise ValueError(f"expert capacity {capacity} exceeds the group size {s} (expert choice)")
    probs = jax.nn.softmax(logits, axis=-1)
    # Padding never wins a slot while a real token is left (probabilities are >= 0).
    scores = jnp.where(valid[..., None], probs, -1.0).transpose(0, 2, 1)  # [g,e,s]
    # A stable sort, not lax.top_k: XLA partitions sort along the sharded group axis, while
    # top_k all-gathers the scores. Ties go to the lower token index either way.
    token = jnp.argsort(-scores, axis=-1, stable=True)[..., :capacity]  # [g,e,c]
    picked = jax.nn.one_hot(token, s, dtype=jnp.int32)  # [g,e,c,s]
    chosen = jnp.einsum("gecs->gse", picked) > 0
    slot = jnp.einsum("gecs,c->gse", picked, jnp.arange(capacity, dtype=jnp.int32))
    kept = chosen & valid[..., None]
    index = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
    return RouterOutput(
        expert_index=index, slot=slot, gate=jnp.where(kept, probs, 0.0), kept=kept,
        load_balance_loss=jnp.zeros((), jnp.float32),
        router_z_loss=self.z_loss(logits, valid),
        metrics=routing_metrics(probs, kept, index, valid))


def check_router(router: Any, causal: bool) -> None:
  """Raise a one-line error when a router that leaks later tokens is used in a decoder."""
  if causal and not router.causal_safe:
    what = ("batch_prioritized routing" if isinstance(router, TokensChooseRouter)
            else type(router).__name__)
    raise ValueError(f"{what} leaks future tokens and cannot be used in a causal (decoder) "
                     "MoE layer; use TokensChooseRouter without batch_prioritized there")
