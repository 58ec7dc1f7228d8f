"""Routing decision -> tokens moved to the experts and back. Three strategies, one interface:

- `einsum` (GShard / Switch, what TPUs like): the one-hot dispatch mask [g,s,e,c] and the
  combine weights [g,s,e,c]; two einsums move the tokens. Under an expert mesh axis each einsum's
  change of layout (g-sharded <-> e-sharded) is one all-to-all.
- `indices`: the same capacity and dropping, but tokens are scattered into the [e, g·c, m]
  expert buffers by (expert, slot) index and gathered back: no O(S·E·C) mask.
- `dropless`: tokens sorted by expert and run with grouped matmuls (jax.lax.ragged_dot), no
  capacity and no dropping (MegaBlocks / MaxText style).

Every strategy takes tokens x [g,s,m] and returns the combined expert outputs [g,s,m]; a token
no expert kept gets exactly 0 (it continues through the residual).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routing import RouterOutput

Array = jax.Array

# Logical axes of the group-side tensors [g,s,m] (g sharded over data × expert) and of the
# expert-side tensors [e,g,c,m] (e over 'expert', g over the data replicas).
GROUP_AXES = ("batch", "length", "embed")
EXPERT_AXES = ("expert", "expert_replicas", "unmodeled", "embed")
HIDDEN_AXES = ("expert", "expert_replicas", "unmodeled", "expert_mlp")


@dataclasses.dataclass(frozen=True)
class Experts:
  """Stacked expert FFN weights: wi a list of [e,m,h] (one per activation; gated when two),
  wo [e,h,m], all already in the compute dtype. `dropout` acts on hidden activations."""
  wi: Sequence[Array]
  wo: Array
  activations: Sequence[Callable[[Array], Array]]
  dropout: Callable[[Array], Array]

  def dense(self, x: Array) -> Array:
    """Expert buffers x [e,g,c,m] -> [e,g,c,m]."""
    h = 1.0
    for w, act in zip(self.wi, self.activations):
      h = h * act(nn.with_logical_constraint(jnp.einsum("egcm,emh->egch", x, w), HIDDEN_AXES))
    return jnp.einsum("egch,ehm->egcm", self.dropout(h), self.wo)

  def ragged(self, x: Array, group_sizes: Array) -> Array:
    """Rows x [n,m] sorted by expert, group_sizes [e] rows per expert -> [n,m]; rows past
    sum(group_sizes) come out 0."""
    h = 1.0
    for w, act in zip(self.wi, self.activations):
      h = h * act(jax.lax.ragged_dot(x, w, group_sizes))
    return jax.lax.ragged_dot(self.dropout(h), self.wo, group_sizes)


def dispatch_and_combine(decision: RouterOutput, num_experts: int, capacity: int,
                         dtype: jnp.dtype = jnp.float32) -> tuple[Array, Array]:
  """Decision [g,s,k] -> dispatch mask [g,s,e,c] (one-hot, `dtype`) and combine weights
  [g,s,e,c] (float32). Each (expert, slot) holds at most one token; a dropped assignment has an
  all-zero row."""
  expert = jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.float32)  # [g,s,k,e]
  expert = expert * decision.kept[..., None]
  slot = jax.nn.one_hot(decision.slot, capacity, dtype=jnp.float32)  # [g,s,k,c]
  dispatch = jnp.einsum("gske,gskc->gsec", expert, slot)
  combine = jnp.einsum("gsk,gske,gskc->gsec", decision.gate, expert, slot)
  return dispatch.astype(dtype), combine


def einsum_dispatch(x: Array, decision: RouterOutput, experts: Experts, capacity: int) -> Array:
  num_experts = experts.wo.shape[0]
  dispatch, combine = dispatch_and_combine(decision, num_experts, capacity, x.dtype)
  dispatch = nn.with_logical_constraint(dispatch, ("batch", "length", None, None))
  expert_in = jnp.einsum("gsm,gsec->egcm", x, dispatch)  # all-to-all: g -> e
  expert_in = nn.with_logical_constraint(expert_in, EXPERT_AXES)
  expert_out = nn.with_logical_constraint(experts.dense(expert_in), EXPERT_AXES)
  y = jnp.einsum("egcm,gsec->gsm", expert_out, combine.astype(x.dtype))  # all-to-all: e -> g
  return nn.with_logical_constraint(y, GROUP_AXES)


def indices_dispatch(x: Array, decision: RouterOutput, experts: Experts, capacity: int) -> Array:
  g, s, m = x.shape
  k = decision.expert_index.shape[-1]
  num_experts = experts.wo.shape[0]
  size = num_experts * g * capacity
  # Row of each assignment in the flattened [e, g, c] buffer; not-kept rows point past the end
  # so the scatter drops them and the gather reads 0.
  row = (decision.expert_index * g + jnp.arange(g)[:, None, None]) * capacity + decision.slot
  row = jnp.where(decision.kept, row, size).reshape(-1)  # [g·s·k]
  tokens = jnp.broadcast_to(x[:, :, None], (g, s, k, m)).reshape(-1, m)
  buf = jnp.zeros((size, m), x.dtype).at[row].set(tokens, mode="drop", unique_indices=True)
  expert_in = nn.with_logical_constraint(buf.reshape(num_experts, g, capacity, m), EXPERT_AXES)
  expert_out = experts.dense(expert_in).reshape(size, m)
  out = expert_out.at[row].get(mode="fill", fill_value=0).reshape(g, s, k, m)
  y = jnp.einsum("gskm,gsk->gsm", out, decision.gate.astype(x.dtype))
  return nn.with_logical_constraint(y, GROUP_AXES)


def dropless_dispatch(x: Array, decision: RouterOutput, experts: Experts, capacity: int) -> Array:
  del capacity  # the layer routes with C = S, so every active assignment is kept
  g, s, m = x.shape
  k = decision.expert_index.shape[-1]
  num_experts = experts.wo.shape[0]
  expert = jnp.where(decision.kept, decision.expert_index, num_experts).reshape(-1)  # [n]
  order = jnp.argsort(expert, stable=True)  # kept rows grouped by expert, the rest last
  rows = experts.ragged(x.reshape(g * s, m)[order // k],
                        jnp.bincount(expert, length=num_experts).astype(jnp.int32))
  rows = rows * decision.gate.reshape(-1)[order][:, None].astype(x.dtype)
  y = jnp.zeros((g * s, m), x.dtype).at[order // k].add(rows)
  return nn.with_logical_constraint(y.reshape(g, s, m), GROUP_AXES)


STRATEGIES = {"einsum": einsum_dispatch, "indices": indices_dispatch,
              "dropless": dropless_dispatch}
