"""Routing decision -> tensors that move tokens to the experts and back.

The `einsum` strategy (GShard / Switch, what TPUs like) builds the one-hot dispatch mask
[g,s,e,c] and the combine weights [g,s,e,c] and moves tokens with two einsums; under an expert
mesh axis each einsum's output layout change is one all-to-all.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routing import RouterOutput

Array = jax.Array

# Logical axes of the expert-side tensors [e, g, c, m]: e over 'expert', g over the data
# replicas; the group-side tensors [g, s, m] are sharded on g over data × expert.
GROUP_AXES = ("batch", "length", "embed")
EXPERT_AXES = ("expert", "expert_replicas", "unmodeled", "embed")


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


def einsum_dispatch(x: Array, decision: RouterOutput, expert_fn: Callable[[Array], Array],
                    num_experts: int, capacity: int, dtype: jnp.dtype) -> Array:
  """Tokens x [g,s,m] -> experts -> combined outputs [g,s,m] (float32 accumulation of the
  combine in `dtype`). A dropped token's output is exactly 0."""
  dispatch, combine = dispatch_and_combine(decision, num_experts, capacity, dtype)
  dispatch = nn.with_logical_constraint(dispatch, ("batch", "length", "unmodeled", "unmodeled"))
  expert_in = jnp.einsum("gsm,gsec->egcm", x.astype(dtype), dispatch)  # all-to-all: g -> e
  expert_in = nn.with_logical_constraint(expert_in, EXPERT_AXES)
  expert_out = nn.with_logical_constraint(expert_fn(expert_in), EXPERT_AXES)
  y = jnp.einsum("egcm,gsec->gsm", expert_out, combine.astype(dtype))  # all-to-all: e -> g
  return nn.with_logical_constraint(y, GROUP_AXES)


STRATEGIES = {"einsum": einsum_dispatch}
