"""Routing decision -> tokens moved to the experts and back. Three strategies, one interface:

- `einsum` (GShard / Switch, what TPUs like): the one-hot dispatch mask [g,s,e,c] and the
  combine weights [g,s,e,c]; two einsums move the tokens. Under an expert mesh axis each einsum's
  change of layout (g-sharded <-> e-sharded) is one all-to-all.
- `indices`: the same capacity and dropping, but tokens are scattered into the [e, g·c, m]
  expert buffers by (expert, slot) index and gathered back: no O(S·E·C) mask.
- `dropless`: no capacity and no dropping (MegaBlocks / megablox style): assignments sorted by
  expert, each expert's rows padded to a multiple of ROW_UNIT, and a grouped matmul per expert
  weight (`grouped_matmul`: one GEMM per expert over a window of rows on CPU, megablox's Pallas
  kernel on TPU, ragged_dot elsewhere). Under a mesh it runs per device with shard_map, experts
  sharded over 'expert' and their hidden units over 'model'.

Every strategy takes tokens x [g,s,m] and returns the combined expert outputs [g,s,m]; a token
no expert kept gets exactly 0 (it continues through the residual).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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
  wo [e,h,m], all already in the compute dtype. Dropout at dropout_rate acts on the hidden
  activations when dropout_rng is given (training): element-wise, or with
  dropout_broadcast_tokens one mask [e,h] per expert shared by all its tokens. grouped_impl:
  the grouped matmul of `grouped` (see grouped_matmul; None picks by backend)."""
  wi: Sequence[Array]
  wo: Array
  activations: Sequence[Callable[[Array], Array]]
  dropout_rate: float = 0.0
  dropout_rng: Array | None = None
  dropout_broadcast_tokens: bool = False
  grouped_impl: str | None = None

  def dropout(self, h: Array, row_expert: Array | None = None) -> Array:
    """h [e,g,c,h], or rows [n,h] whose experts are row_expert [n]."""
    if self.dropout_rng is None or self.dropout_rate == 0.0:
      return h
    keep = 1.0 - self.dropout_rate
    if not self.dropout_broadcast_tokens:
      mask = jax.random.bernoulli(self.dropout_rng, keep, h.shape)
    else:
      mask = jax.random.bernoulli(self.dropout_rng, keep, (self.wo.shape[0], h.shape[-1]))
      mask = mask[:, None, None] if row_expert is None else mask[row_expert]
    return jnp.where(mask, h / keep, 0.0).astype(h.dtype)

  def dense(self, x: Array) -> Array:
    """Expert buffers x [e,g,c,m] -> [e,g,c,m].

    The matmuls see each expert's rows as one dim r = g·c: plain batched GEMMs whose weight
    gradients contract one dim (with g and c apart, XLA:CPU transposes the operands first)."""
    e, g, c, m = x.shape
    rows = x.reshape(e, g * c, m)
    h = 1.0
    for w, act in zip(self.wi, self.activations):
      hidden = jnp.einsum("erm,emh->erh", rows, w).reshape(e, g, c, -1)
      h = h * act(nn.with_logical_constraint(hidden, HIDDEN_AXES))
    h = self.dropout(h)
    return jnp.einsum("erh,ehm->erm", h.reshape(e, g * c, -1), self.wo).reshape(e, g, c, m)

  def grouped(self, x: Array, group_sizes: Array) -> Array:
    """Rows x [n,m] grouped by expert, group_sizes [e] rows per expert -> [n,m]; rows past
    sum(group_sizes) come out 0."""
    h = 1.0
    for w, act in zip(self.wi, self.activations):
      h = h * act(grouped_matmul(x, w, group_sizes, self.grouped_impl))
    row_expert = None
    if self.dropout_broadcast_tokens:  # rows past the last expert's clamp to it; they come out 0
      row_expert = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes,
                              total_repeat_length=x.shape[0])
    return grouped_matmul(self.dropout(h, row_expert), self.wo, group_sizes, self.grouped_impl)


# Grouped matmul: rows x [n,k] in consecutive groups, group i of group_sizes[i] rows times w[i]
# [k,o]. XLA:CPU lowers ragged_dot to one masked dense matmul per group (E x the FLOPs), so on
# CPU ('windows') each group is one plain 2-D GEMM over a window of rows: the smallest of a
# ladder of static sizes (multiples of ROW_UNIT, about WINDOW_RATIO apart) that holds the group,
# rows outside the group masked; one loop per window size. One GEMM per group, not blocks: each
# GEMM copies and packs its group's whole weight, and blocks of 16-256 rows (the remainders)
# cost more in that than in FLOPs.
ROW_UNIT = 16
WINDOW_RATIO = 1.125
GROUPED_IMPLS = ("windows", "megablox", "megablox_interpret", "ragged_dot")


def window_sizes(num_rows: int) -> list[int]:
  """The ladder of window sizes up to num_rows (the last; it holds any group)."""
  sizes = [ROW_UNIT]
  while sizes[-1] < num_rows:
    step = -(-int(sizes[-1] * WINDOW_RATIO) // ROW_UNIT) * ROW_UNIT - sizes[-1]
    sizes.append(sizes[-1] + max(step, ROW_UNIT))
  return sizes[:-1] + [num_rows]


def grouped_matmul(x: Array, w: Array, group_sizes: Array, impl: str | None = None) -> Array:
  """x [n,k], w [e,k,o], group_sizes [e] int (sum <= n) -> [n,o]; rows past the groups are 0.

  impl: 'windows' (pure JAX, the CPU default), 'megablox' (Pallas TPU kernel, TPU default),
  'megablox_interpret' (the same kernel in Pallas interpret mode, for CPU tests), 'ragged_dot'
  (jax.lax.ragged_dot; the default elsewhere).
  """
  impl = impl or {"cpu": "windows", "tpu": "megablox"}.get(jax.default_backend(), "ragged_dot")
  group_sizes = group_sizes.astype(jnp.int32)
  # Inside shard_map: both operands vary over the same axes, so each cotangent has its
  # operand's type (the cast's transpose sums the weight's gradient over the token shards).
  x, w = _varying_like(x, w, group_sizes), _varying_like(w, x, group_sizes)
  if impl == "windows":
    return _windowed_gmm(x, w, group_sizes)
  if impl in ("megablox", "megablox_interpret"):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
    tiling = tuple(next((t for t in (128, 64, 32, 16, 8) if d % t == 0), d)
                   for d in (x.shape[0], *w.shape[1:]))  # tiles must divide the dims
    total = jnp.sum(group_sizes)  # the kernel leaves rows past the groups unwritten, both ways
    y = megablox.gmm(_zero_rows_past(x, total), w, group_sizes, x.dtype, tiling, None, None,
                     False, impl == "megablox_interpret")
    return _zero_rows_past(y, total)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x, w, group_sizes)
  raise ValueError(f"grouped matmul impl={impl!r} is not one of {GROUPED_IMPLS}")


@jax.custom_vjp
def _zero_rows_past(a: Array, total: Array) -> Array:
  """a [n,d] with rows >= total set to 0, and so is its cotangent."""
  return jnp.where((jnp.arange(a.shape[0]) < total)[:, None], a, 0)


_zero_rows_past.defvjp(lambda a, total: (_zero_rows_past(a, total), total),
                       lambda total, da: (_zero_rows_past(da, total), None))


def _windows(group_sizes: Array, num_rows: int
             ) -> list[tuple[int, Callable[[Array], Array], Array]]:
  """Per window size p: i -> the i-th group whose window it is, and how many
  groups take it (an empty group takes none)."""
  sizes = window_sizes(num_rows)
  window = jnp.where(group_sizes > 0, jnp.searchsorted(jnp.array(sizes), group_sizes), -1)
  order = jnp.argsort(window, stable=True)  # groups by window; empty ones first
  counts = jnp.bincount(window + 1, length=len(sizes) + 1)
  offsets = jnp.cumsum(counts) - counts
  return [(p, lambda i, j=j: order[offsets[j + 1] + i], counts[j + 1])
          for j, p in enumerate(sizes)]


def _window(starts: Array, group_sizes: Array, e: Array, p: int, num_rows: int
            ) -> tuple[Array, Array]:
  """Group e's window of p rows: its first row (moved back when the window would run past the
  last row) and which of its rows are the group's [p]."""
  start = jnp.minimum(starts[e], num_rows - p)
  row = start + jnp.arange(p)
  return start, (row >= starts[e]) & (row < starts[e] + group_sizes[e])


def _varying_like(a: Array, *refs: Array) -> Array:
  """a typed as varying over the manual mesh axes any of refs varies over (inside shard_map a
  loop's zero-initialized carry must match what its body makes of varying inputs)."""
  axes = set().union(*(jax.typeof(r).mat.varying for r in refs)) - jax.typeof(a).mat.varying
  return jax.lax.pcast(a, tuple(sorted(axes)), to="varying") if axes else a


def _windows_matmul(x: Array, w: Array, group_sizes: Array, contract: int) -> Array:
  """x [n,k] @ w[group] per group window, w contracted on axis `contract` (1: w [e,k,o], 2: w
  [e,o,k], the transpose) -> [n,o]."""
  out = _varying_like(jnp.zeros((x.shape[0], w.shape[3 - contract]), x.dtype), x, w, group_sizes)
  starts = jnp.cumsum(group_sizes) - group_sizes
  for p, group, count in _windows(group_sizes, x.shape[0]):
    def body(i, out, p=p, group=group):
      e = group(i)
      start, mine = _window(starts, group_sizes, e, p, x.shape[0])
      rows = jax.lax.dynamic_slice_in_dim(x, start, p)
      y = jax.lax.dot_general(rows, w[e], (((1,), (contract - 1,)), ((), ())))
      old = jax.lax.dynamic_slice_in_dim(out, start, p)  # other groups' rows stay
      return jax.lax.dynamic_update_slice_in_dim(
          out, jnp.where(mine[:, None], y.astype(out.dtype), old), start, 0)
    out = jax.lax.fori_loop(0, count, body, out)
  return out


def _windows_weight_grad(x: Array, dy: Array, group_sizes: Array, num_groups: int) -> Array:
  """Each group's x^T dy over its rows: x [n,k], dy [n,o] -> [e,k,o] float32 (0 for empty)."""
  dw = _varying_like(jnp.zeros((num_groups, x.shape[1], dy.shape[1]), jnp.float32),
                     x, dy, group_sizes)
  starts = jnp.cumsum(group_sizes) - group_sizes
  for p, group, count in _windows(group_sizes, x.shape[0]):
    def body(i, dw, p=p, group=group):
      e = group(i)
      start, mine = _window(starts, group_sizes, e, p, x.shape[0])
      rows, grads = (jax.lax.dynamic_slice_in_dim(a, start, p) for a in (x, dy))
      part = jax.lax.dot_general(rows, jnp.where(mine[:, None], grads, 0),
                                 (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_index_in_dim(dw, part, e, 0)
    dw = jax.lax.fori_loop(0, count, body, dw)
  return dw


@jax.custom_vjp
def _windowed_gmm(x: Array, w: Array, group_sizes: Array) -> Array:
  return _windows_matmul(x, w, group_sizes, contract=1)


def _windowed_gmm_fwd(x, w, group_sizes):
  return _windows_matmul(x, w, group_sizes, contract=1), (x, w, group_sizes)


def _windowed_gmm_bwd(res, dy):
  x, w, group_sizes = res
  dx = _windows_matmul(dy, w, group_sizes, contract=2)
  dw = _windows_weight_grad(x, dy, group_sizes, w.shape[0]).astype(w.dtype)
  return dx, dw, None


_windowed_gmm.defvjp(_windowed_gmm_fwd, _windowed_gmm_bwd)


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


@jax.custom_vjp
def take_rows(a: Array, index: Array, inverse: Array) -> Array:
  """a [n,m] -> [len(index),m], row i = a[index[i]], 0 where index[i] is out of range. `inverse`
  [n] is index's inverse (inverse[index[i]] = i; out of range for rows nobody takes), so that
  the gradient is a gather too rather than a scatter-add (slow on XLA:CPU)."""
  return a.at[index].get(mode="fill", fill_value=0)


take_rows.defvjp(lambda a, index, inverse: (take_rows(a, index, inverse), (index, inverse)),
                 lambda res, ct: (take_rows(ct, res[1], res[0]), None, None))


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
  assignment = jnp.full(size, g * s * k).at[row].set(jnp.arange(g * s * k), mode="drop")
  tokens = jnp.broadcast_to(x[:, :, None], (g, s, k, m)).reshape(-1, m)
  buf = take_rows(tokens, assignment, row)  # empty slots: 0
  expert_in = nn.with_logical_constraint(buf.reshape(num_experts, g, capacity, m), EXPERT_AXES)
  expert_out = experts.dense(expert_in).reshape(size, m)
  out = take_rows(expert_out, row, assignment).reshape(g, s, k, m)
  y = jnp.einsum("gskm,gsk->gsm", out, decision.gate.astype(x.dtype))
  return nn.with_logical_constraint(y, GROUP_AXES)


def dropless_dispatch(x: Array, decision: RouterOutput, experts: Experts, capacity: int) -> Array:
  del capacity  # the layer routes with C = S, so every active assignment is kept
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    y = _grouped_ffn(x, decision.expert_index, decision.kept, decision.gate, experts)
  else:
    y = _dropless_sharded(x, decision, experts)
  return nn.with_logical_constraint(y, GROUP_AXES)


def _grouped_ffn(x: Array, expert_index: Array, kept: Array, gate: Array,
                 experts: Experts) -> Array:
  """x [g,s,m]; expert_index / kept / gate [g,s,k] -> [g,s,m]: every kept assignment through
  its expert (an index into experts' weights) with grouped matmuls. The n = g·s·k assignments
  are laid out sorted by expert, each expert's rows padded to a multiple of ROW_UNIT, in a
  buffer of static size n + e·(ROW_UNIT-1) rounded up to ROW_UNIT (linear in tokens)."""
  g, s, m = x.shape
  k = expert_index.shape[-1]
  num_experts = experts.wo.shape[0]
  n = g * s * k
  size = -(-(n + num_experts * (ROW_UNIT - 1)) // ROW_UNIT) * ROW_UNIT
  expert = jnp.where(kept, expert_index, num_experts).reshape(-1)  # [n]; not kept: e
  counts = jnp.bincount(expert, length=num_experts)
  padded = -(-counts // ROW_UNIT) * ROW_UNIT
  order = jnp.argsort(expert, stable=True)  # assignments grouped by expert, not kept last
  sorted_expert = expert[order]
  first = jnp.append(jnp.cumsum(padded) - padded, size)  # first row of each expert; e: past the end
  rank = jnp.arange(n) - jnp.append(jnp.cumsum(counts) - counts, 0)[sorted_expert]
  row = jnp.zeros(n, jnp.int32).at[order].set(first[sorted_expert] + rank)  # [n] buffer row
  assignment = jnp.full(size, n, jnp.int32).at[row].set(jnp.arange(n), mode="drop")  # [size]
  tokens = jnp.broadcast_to(x[:, :, None], (g, s, k, m)).reshape(n, m)
  out = experts.grouped(take_rows(tokens, assignment, row), padded.astype(jnp.int32))
  y = take_rows(out, row, assignment).reshape(g, s, k, m)  # not kept: 0
  return jnp.einsum("gskm,gsk->gsm", y, gate.astype(x.dtype))


def mesh_axes(logical_name: str) -> tuple[str, ...]:
  """The mesh axes the active logical axis rules map `logical_name` to (() without rules)."""
  entry = nn.logical_to_mesh_axes((logical_name,))[0]
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_partitions() -> int:
  """How many ways the mesh in force (jax.set_mesh; abstract or real) splits the 'batch' axis
  under the active logical axis rules: data × expert in a Partitioner's steps, 1 outside."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for a in mesh_axes("batch"))


def _dropless_sharded(x: Array, decision: RouterOutput, experts: Experts) -> Array:
  """Dropless under a mesh, per device with jax.shard_map (a grouped matmul has no SPMD rule
  that keeps experts sharded). Each device holds groups (over the batch axes) and experts (over the
  expert axes): it all-gathers the tokens of its expert-axis peers, runs those assigned to its
  own experts, and a reduce-scatter returns every token's sum to its owner. Per device that
  sends X-1 copies of its [g,s,m] block each way (X: expert partitions), where the
  capacity-bounded strategies' all-to-alls send about cf·k/X as much."""
  batch_axes, expert_axes, mlp_axes = map(mesh_axes, ("batch", "expert", "expert_mlp"))
  parts = batch_partitions()
  g = x.shape[0]
  if g % parts:
    raise ValueError(f"dispatch='dropless' on this mesh needs the MoE groups ({g}) to be a "
                     f"multiple of the {parts} batch partitions {batch_axes}; set the layer's "
                     "num_groups or group_size")
  gathered = tuple(a for a in expert_axes if a in batch_axes)  # token peers of my experts
  replicated = tuple(a for a in expert_axes if a not in batch_axes)
  all_axes = jax.sharding.get_abstract_mesh().axis_names
  rng = experts.dropout_rng

  def body(x, expert_index, kept, gate, wi, wo, rng=None):
    if gathered:
      x, expert_index, kept, gate = (jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                                     for a in (x, expert_index, kept, gate))
    first = jax.lax.axis_index(expert_axes) * wo.shape[0] if expert_axes else 0
    local = expert_index - first
    mine = kept & (local >= 0) & (local < wo.shape[0])
    if rng is not None:  # a different mask on every device
      rng = jax.random.fold_in(rng, jax.lax.axis_index(all_axes))
    shard = dataclasses.replace(experts, wi=wi, wo=wo, dropout_rng=rng)
    y = _grouped_ffn(x, jnp.where(mine, local, 0), mine, gate, shard)
    if mlp_axes:  # partial sums over the hidden units
      y = jax.lax.psum(y, mlp_axes)
    if gathered:
      y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
    if replicated:
      y = jax.lax.psum(y, replicated)
    return y

  tokens = P(batch_axes or None, None, None)
  w_in, w_out = P(expert_axes or None, None, mlp_axes or None), P(expert_axes or None,
                                                                   mlp_axes or None, None)
  specs = [tokens] * 4 + [[w_in] * len(experts.wi), w_out]
  args = [x, decision.expert_index, decision.kept, decision.gate, list(experts.wi), experts.wo]
  if rng is not None:
    specs.append(P())
    args.append(rng)
  return jax.shard_map(body, in_specs=tuple(specs), out_specs=tokens)(*args)


STRATEGIES = {"einsum": einsum_dispatch, "indices": indices_dispatch,
              "dropless": dropless_dispatch}
