"""MoeLayer: tokens [b,l,m] -> groups [g,s,m] -> route -> dispatch -> experts -> combine.

A dropped token's output is exactly 0; it continues through the block's residual connection.
Losses and metrics are sown into the flax collection 'moe' (apply with mutable=['moe']);
`summarize` turns that collection into the model's aux losses and per-layer metrics.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import layers
from moe_jax import routing

Array = jax.Array

_LOSSES = ("load_balance_loss", "router_z_loss")


GROUP_RULES = ("ceil", "flaxformer", "sequence")
LAYER_LOSS_REDUCTIONS = ("mean", "sum")


def group_shape(num_tokens: int, *, group_size: int | None, num_groups: int | None,
                num_expert_partitions: int = 1, batch_partitions: int = 1,
                rule: str = "ceil", num_experts: int = 1) -> tuple[int, int]:
  """(G, S) for `num_tokens` tokens; G·S >= num_tokens, the rest is padding.

  `num_groups` wins when given (a multiple of the expert partitions, so each expert shard gets
  whole groups). Otherwise, by `rule`:
    ceil (default): G = ceil(T / group_size) rounded up to a multiple of both the expert
      partitions and the batch partitions (data × expert), so that every device routes whole
      groups of its own, as in GShard / Mesh TensorFlow (at least one group per core).
    flaxformer: the smallest G >= max(T // group_size, E·R) that divides T and is a multiple
      of E·R, R = batch partitions / expert partitions (flaxformer's expert replicas).
  """
  if rule not in GROUP_RULES:
    raise ValueError(f"group rule={rule!r} is not one of {GROUP_RULES}")
  if num_groups is not None:
    if num_groups % num_expert_partitions:
      raise ValueError(f"num_groups={num_groups} must be a multiple of "
                       f"num_expert_partitions={num_expert_partitions}")
    g = num_groups
  elif group_size is None:
    raise ValueError("MoeLayer needs group_size or num_groups")
  elif rule == "flaxformer":
    multiple = num_experts * max(1, batch_partitions // num_expert_partitions)
    g = max(num_tokens // group_size, multiple)
    while g < num_tokens and (num_tokens % g or g % multiple):
      g += 1
    if num_tokens % g or g % multiple:
      raise ValueError(f"group rule 'flaxformer': no group count divides {num_tokens} tokens "
                       f"and is a multiple of {multiple} (experts × replicas)")
  else:
    multiple = math.lcm(num_expert_partitions, batch_partitions)
    g = -(-math.ceil(num_tokens / group_size) // multiple) * multiple
  return g, -(-num_tokens // g)


class MoeLayer(nn.Module):
  """Sparse feed-forward block: a router and E expert FFNs with stacked weights.

  Attributes:
    num_experts: E.
    d_ff: expert hidden dim h.
    router: a routing.Router (TokensChooseRouter, ExpertsChooseRouter).
    train_capacity_factor / eval_capacity_factor: cf in training / when deterministic.
    min_expert_capacity, capacity_mode, capacity_multiple_of: see routing.expert_capacity.
    fixed_capacity: when set, C in tokens per group for training and eval alike, ignoring the
      capacity factors (HF Switch's expert_capacity, with group_rule='sequence').
    group_size / num_groups: how tokens are grouped (num_groups wins when set; see group_shape).
    group_rule: 'ceil' or 'flaxformer' (see group_shape), or 'sequence': one group per
      sequence (G = b, S = l), as HF counts capacity.
    num_expert_partitions: the mesh's 'expert' size: groups come in multiples of it (and of
      the mesh's batch partitions, read from the mesh in force; see group_shape).
    activations: ('relu',) for T5 v1.0, ('gelu', 'linear') for gated-gelu (v1.1).
    dropout_rate: expert dropout on the hidden activations.
    dropout_broadcast_tokens: one dropout mask per expert shared by all its tokens
      (flaxformer's MlpBlock in a vmap); False drops element-wise.
    decode_as_scoring: cached decoding carries each sequence's expert fill across steps, so it
      routes as scoring the sequence does (see __call__); False routes every step on its own,
      as HF's cached generate does.
    init_scale: variance-scaling scale of the expert kernels (Switch Sec. 2.4: 0.1); the
      router has its own router_init_scale.
    dtype: dtype of the dispatched activations and expert matmuls (bfloat16 on TPU); the router
      is always float32.
    causal: the layer sits in a decoder; routers that see later tokens are refused.
    route_padding: padding tokens enter as zero vectors and are routed like real ones (they
      take capacity and count in the router losses), as in flaxformer's whole models: its
      layers zero the MoE input at padding positions and moe.gin routes every token.
    dispatch: a strategy in dispatch.STRATEGIES, or 'auto' (see `dispatch_strategy`).
    grouped_matmul: dropless's grouped matmul, one of dispatch.GROUPED_IMPLS; None picks by
      backend ('windows' on CPU, 'megablox' on TPU, 'ragged_dot' elsewhere).
  """
  num_experts: int
  d_ff: int
  router: routing.Router
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  capacity_mode: str = "ceil"
  capacity_multiple_of: int = 1
  fixed_capacity: int | None = None
  group_size: int | None = 1024
  num_groups: int | None = None
  group_rule: str = "ceil"
  num_expert_partitions: int = 1
  activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.0
  dropout_broadcast_tokens: bool = False
  decode_as_scoring: bool = True
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  causal: bool = False
  route_padding: bool = False
  dispatch: str = "auto"
  grouped_matmul: str | None = None

  def __post_init__(self):
    if self.router.num_experts != self.num_experts:
      raise ValueError(f"router num_experts={self.router.num_experts} != MoeLayer "
                       f"num_experts={self.num_experts}")
    if self.num_experts % self.num_expert_partitions:
      raise ValueError(f"num_experts={self.num_experts} is not divisible by "
                       f"num_expert_partitions={self.num_expert_partitions}")
    if self.dispatch != "auto" and self.dispatch not in dispatch_lib.STRATEGIES:
      raise ValueError(f"dispatch={self.dispatch!r} is not 'auto' or one of "
                       f"{sorted(dispatch_lib.STRATEGIES)}")
    if self.grouped_matmul is not None and self.grouped_matmul not in dispatch_lib.GROUPED_IMPLS:
      raise ValueError(f"grouped_matmul={self.grouped_matmul!r} is not None or one of "
                       f"{dispatch_lib.GROUPED_IMPLS}")
    layers.check_activations(self.activations)
    if self.group_rule not in GROUP_RULES:
      raise ValueError(f"group_rule={self.group_rule!r} is not one of {GROUP_RULES}")
    if self.dispatch == "dropless" and isinstance(self.router, routing.ExpertsChooseRouter):
      raise ValueError("dispatch='dropless' needs a tokens-choose router: expert choice is "
                       "capacity-bounded by definition")
    routing.check_router(self.router, self.causal)
    super().__post_init__()

  def dispatch_strategy(self) -> str:
    """The strategy 'auto' resolves to. It only picks among strategies with the same capacity
    and dropping semantics: einsum when experts are sharded (its layout change is exactly one
    all-to-all each way) and on TPU/GPU; indices on CPU, where it measured fastest
    (benchmarks/RESULTS.md). Dropless changes the semantics, so it is only used when named."""
    if self.dispatch != "auto":
      return self.dispatch
    if self.num_expert_partitions > 1 or jax.default_backend() != "cpu":
      return "einsum"
    return "indices"

  def group_shape(self, batch: int, length: int, batch_partitions: int) -> tuple[int, int]:
    """(G, S) for a [batch, length] input on a mesh with `batch_partitions`."""
    sequence = self.group_rule == "sequence"
    return group_shape(batch * length, group_size=self.group_size,
                       num_groups=batch if sequence else self.num_groups,
                       num_expert_partitions=self.num_expert_partitions,
                       batch_partitions=batch_partitions, rule=self.group_rule,
                       num_experts=self.num_experts)

  def expert_capacity(self, group_size: int, deterministic: bool) -> int:
    if self.dispatch == "dropless":
      return group_size  # an expert can take every token of the group: nothing drops
    if self.fixed_capacity is not None:
      return self.fixed_capacity
    cf = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    return routing.expert_capacity(
        group_size, self.num_experts, cf, num_selected_experts=self.router.capacity_k,
        min_capacity=self.min_expert_capacity, mode=self.capacity_mode,
        multiple_of=self.capacity_multiple_of)

  def experts(self, m: int, deterministic: bool) -> dispatch_lib.Experts:
    """Stacked expert weights wi [e,m,h] (wi_0, wi_1 when gated) and wo [e,h,m]."""
    e = self.num_experts
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal",
                                            in_axis=-2, out_axis=-1, batch_axis=(0,))
    names = ["wi"] if len(self.activations) == 1 else [f"wi_{i}" for i in range(len(self.activations))]
    wi = [self.param(n, nn.with_logical_partitioning(init, ("expert", "embed", "expert_mlp")),
                     (e, m, self.d_ff), jnp.float32) for n in names]
    wo = self.param("wo", nn.with_logical_partitioning(init, ("expert", "expert_mlp", "embed")),
                    (e, self.d_ff, m), jnp.float32)
    training = not deterministic and self.dropout_rate > 0
    return dispatch_lib.Experts(
        wi=[jnp.asarray(w, self.dtype) for w in wi], wo=jnp.asarray(wo, self.dtype),
        activations=[layers.ACTIVATIONS[a] for a in self.activations],
        dropout_rate=self.dropout_rate, dropout_rng=self.make_rng("dropout") if training else None,
        dropout_broadcast_tokens=self.dropout_broadcast_tokens, grouped_impl=self.grouped_matmul)

  @nn.compact
  def __call__(self, x: Array, padding_mask: Array | None = None, *, deterministic: bool,
               decode: bool = False, decode_length: int | None = None) -> Array:
    """x [b,l,m]; padding_mask [b,l] (True = real token) -> [b,l,m] in x's dtype.

    decode=True: cached decoding. The first (cache-creating) call runs the full-length input
    and creates the cache; every later call takes one token per sequence [b,1,m] of sequences
    of decode_length tokens. When the full-length groups lie inside sequences (group_rule
    'sequence', or S divides decode_length), each step routes every row as its own group and
    the cache carries how many assignments each expert's slots already saw in the row's
    current group, so a step keeps, drops and weighs tokens exactly as scoring the whole
    sequence does (top-1; for k > 1 the step's choices compete in k-major order among
    themselves only). Otherwise a step groups its b tokens as one batch of length 1.
    """
    b, l, m = x.shape
    tokens = b * l
    if self.route_padding and padding_mask is not None:
      x = x * padding_mask[..., None].astype(x.dtype)
      padding_mask = None
    valid = (jnp.ones((b, l), bool) if padding_mask is None else padding_mask.astype(bool))
    stepping = decode and self.has_variable("cache", "expert_fill")
    fill = None
    if decode:
      row_fill = self.variable("cache", "expert_fill", jnp.zeros, (b, self.num_experts),
                               jnp.int32)
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if stepping:
      if l != 1 or decode_length is None:
        raise ValueError("cached MoE decoding takes one token per step and needs decode_length")
      _, s_full = self.group_shape(b, decode_length, dispatch_lib.batch_partitions())
    if stepping and self.decode_as_scoring and decode_length % s_full == 0:
      g, s = b, 1
      capacity = self.expert_capacity(s_full, deterministic)
      fill = jnp.where(position.value % s_full == 0, 0, row_fill.value)  # a new group starts
      position.value = position.value + 1
    else:
      g, s = self.group_shape(b, l, dispatch_lib.batch_partitions())
      capacity = self.expert_capacity(s, deterministic)
    pad = g * s - tokens
    groups = jnp.pad(x.reshape(tokens, m), ((0, pad), (0, 0))).reshape(g, s, m)
    valid = jnp.pad(valid.reshape(tokens), (0, pad)).reshape(g, s)
    groups = nn.with_logical_constraint(groups, dispatch_lib.GROUP_AXES)

    decision = self.router(groups, capacity=capacity, valid=valid, deterministic=deterministic,
                           fill=fill)
    if fill is not None:
      row_fill.value = decision.fill
    y = dispatch_lib.STRATEGIES[self.dispatch_strategy()](
        groups.astype(self.dtype), decision, self.experts(m, deterministic), capacity)

    self.sow("moe", "load_balance_loss", decision.load_balance_loss)
    self.sow("moe", "router_z_loss", decision.router_z_loss)
    for name, value in decision.metrics.items():
      self.sow("moe", name, value)
    return y.reshape(g * s, m)[:tokens].reshape(b, l, m).astype(x.dtype)


def summarize(moe_collection: Any, layer_reduction: str = "mean"
              ) -> tuple[dict[str, Array], dict[str, Array]]:
  """The 'moe' collection -> (losses, metrics).

  losses: load_balance_loss and router_z_loss reduced over MoE layers by `layer_reduction`:
    'mean' (default; the same factor weighs the same for any depth) or 'sum' (Mesh TensorFlow,
    HF: each layer's loss adds to the total); 0 without MoE layers.
  metrics: every sown value keyed 'path/to/layer/name', averaged over repeated calls.
  """
  if layer_reduction not in LAYER_LOSS_REDUCTIONS:
    raise ValueError(f"layer_reduction={layer_reduction!r} is not one of "
                     f"{LAYER_LOSS_REDUCTIONS}")
  reduce = jnp.mean if layer_reduction == "mean" else jnp.sum
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(moe_collection or {}), sep="/")
  metrics = {k: jnp.mean(jnp.stack(v), axis=0) for k, v in flat.items()}
  losses = {}
  for name in _LOSSES:
    values = [v for k, v in metrics.items() if k.rsplit("/", 1)[-1] == name]
    losses[name] = reduce(jnp.stack(values)) if values else jnp.zeros((), jnp.float32)
  return losses, metrics
