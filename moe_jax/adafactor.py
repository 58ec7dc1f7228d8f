"""Adafactor's scaling with t5x's logical factor rules (t5x.adafactor with contrib/moe's rules).

Which dimensions of a parameter share factored second-moment statistics, and which dimensions
index independent matrices, is read off the parameter's logical axis names:

- row dims ('embed') and column dims ('vocab', 'mlp', 'heads', 'kv', 'joined_kv', 'expert_mlp'):
  the second moment of a parameter is factored into v_row (mean over the column dims) and
  v_col (mean over the row dims). An attention kernel [m,h,d] ('embed','heads','kv') is
  factored as the matrix [m, h·d] it is.
- batch dims ('expert'): kept in v_row and v_col and left out of every mean, so each expert of a
  stacked weight [e,m,h] has its own statistics, update clipping and parameter scale.
- 'unmodeled' and 'relpos_buckets' are never factored.

A parameter of rank <= 2 without batch dims (or without logical names) uses the classic rule,
as t5x does: factor its two largest dims if the smaller one is >= min_dim_size_to_factor.
Otherwise it is factored when it has both row and column dims, and keeps a full second moment
if not. For params of rank <= 2 this is exactly optax.adafactor's scaling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

PyTree = Any

ROW, COLUMN, BATCH, NONE = "row", "column", "batch", "none"

# Logical axis name -> its role (t5x's standard rules plus contrib/moe's expert rules).
FACTOR_RULES: Mapping[str, str] = {
    "vocab": COLUMN, "embed": ROW, "mlp": COLUMN, "heads": COLUMN, "kv": COLUMN,
    "joined_kv": COLUMN, "expert": BATCH, "expert_mlp": COLUMN, "unmodeled": NONE,
    "relpos_buckets": NONE,
}


@dataclasses.dataclass(frozen=True)
class Factoring:
  """How one parameter is treated: dims factored as rows / columns (both empty: a full second
  moment) and the dims that RMS statistics average over (all but the batch dims)."""
  rows: tuple[int, ...]
  cols: tuple[int, ...]
  averaging: tuple[int, ...]

  @property
  def factored(self) -> bool:
    return bool(self.rows)


def factoring(shape: Sequence[int], axes: Sequence[str | None] | None, *,
              rules: Mapping[str, str] = FACTOR_RULES, factored: bool = True,
              min_dim_size_to_factor: int = 128, name: str = "") -> Factoring:
  """The Factoring of a parameter of `shape` with logical `axes` (None or () if unnamed)."""
  ndim = len(shape)
  everything = tuple(range(ndim))
  named = axes is not None and len(axes) == ndim and all(a is not None for a in axes)
  if named:
    unknown = sorted({a for a in axes if a not in rules})
    if unknown:
      raise ValueError(f"adafactor factor_rules has no rule for logical axis {unknown[0]!r} "
                       f"of param {name or shape}; add it (row, column, batch or none)")
    roles = [rules[a] for a in axes]
    batch = tuple(i for i, r in enumerate(roles) if r == BATCH)
    if ndim > 2 or batch:
      rows = tuple(i for i, r in enumerate(roles) if r == ROW)
      cols = tuple(i for i, r in enumerate(roles) if r == COLUMN)
      averaging = tuple(i for i in everything if i not in batch)
      if not (factored and rows and cols):
        rows = cols = ()
      return Factoring(rows, cols, averaging)
  if factored and ndim >= 2:
    order = np.argsort(shape)  # ties: the later dim counts as the larger (as optax and t5x)
    if shape[order[-2]] >= min_dim_size_to_factor:
      return Factoring((int(order[-2]),), (int(order[-1]),), everything)
  return Factoring((), (), everything)


class ScaleByAdafactorState(NamedTuple):
  count: jax.Array  # steps taken, int32
  v_row: PyTree     # per param: second moment averaged over the column dims ([1] if unused)
  v_col: PyTree     # per param: averaged over the row dims ([1] if unused)
  v: PyTree         # per param: the full second moment of unfactored params ([1] if unused)


def _rms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def scale_by_adafactor(param_axes: PyTree, *, rules: Mapping[str, str] = FACTOR_RULES,
                       decay_rate: float = 0.8, factored: bool = True,
                       min_dim_size_to_factor: int = 128, epsilon: float = 1e-30,
                       clipping_threshold: float | None = 1.0,
                       multiply_by_parameter_scale: bool = True,
                       min_parameter_scale: float = 1e-3) -> optax.GradientTransformation:
  """Adafactor's update direction for learning rate 1, before the sign flip.

  param_axes: a tree like the params whose leaves are PartitionSpecs of logical axis names
    (flax's nn.get_partition_spec of the boxed params); an empty spec means unnamed.
  Per param: the (factored) second moment decays with 1 - (step + 1)^-decay_rate; the
  normalized gradient is divided by max(1, RMS / clipping_threshold) and multiplied by
  max(RMS(param), min_parameter_scale), both RMS over the averaging dims.
  """
  axes_leaves, axes_def = jax.tree_util.tree_flatten(
      param_axes, is_leaf=lambda x: isinstance(x, P))

  def plans(params: PyTree) -> list[Factoring]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if treedef.num_leaves != axes_def.num_leaves:
      raise ValueError(f"adafactor param_axes has {axes_def.num_leaves} leaves, the params "
                       f"{treedef.num_leaves}")
    return [factoring(x.shape, tuple(a), rules=rules, factored=factored,
                      min_dim_size_to_factor=min_dim_size_to_factor,
                      name=jax.tree_util.keystr(path))
            for (path, x), a in zip(flat, axes_leaves)]

  def init(params: PyTree) -> ScaleByAdafactorState:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    stats = {"v_row": [], "v_col": [], "v": []}
    for x, f in zip(leaves, plans(params)):
      placeholder = jnp.zeros((1,), jnp.float32)
      keep_rows = [d for i, d in enumerate(x.shape) if i not in f.cols]
      keep_cols = [d for i, d in enumerate(x.shape) if i not in f.rows]
      stats["v_row"].append(jnp.zeros(keep_rows, jnp.float32) if f.factored else placeholder)
      stats["v_col"].append(jnp.zeros(keep_cols, jnp.float32) if f.factored else placeholder)
      stats["v"].append(placeholder if f.factored else jnp.zeros(x.shape, jnp.float32))
    return ScaleByAdafactorState(
        count=jnp.zeros((), jnp.int32),
        **{k: jax.tree_util.tree_unflatten(treedef, v) for k, v in stats.items()})

  def update(updates: PyTree, state: ScaleByAdafactorState, params: PyTree = None):
    if params is None:
      raise ValueError("adafactor needs the params (parameter scale, factoring)")
    grads, treedef = jax.tree_util.tree_flatten(updates)
    decay = 1.0 - (state.count.astype(jnp.float32) + 1.0) ** -decay_rate
    columns = zip(grads, jax.tree_util.tree_leaves(params), plans(params),
                  jax.tree_util.tree_leaves(state.v_row), jax.tree_util.tree_leaves(state.v_col),
                  jax.tree_util.tree_leaves(state.v))
    out = {"u": [], "v_row": [], "v_col": [], "v": []}
    for g, p, f, v_row, v_col, v in columns:
      g = g.astype(jnp.float32)
      g2 = jnp.square(g) + epsilon
      if f.factored:
        v_row = decay * v_row + (1 - decay) * jnp.mean(g2, axis=f.cols)
        v_col = decay * v_col + (1 - decay) * jnp.mean(g2, axis=f.rows)
        # The row dims' positions in v_row (whose column dims are gone).
        rows_in_v_row = tuple(r - sum(c < r for c in f.cols) for r in f.rows)
        row_factor = (v_row / jnp.mean(v_row, axis=rows_in_v_row, keepdims=True)) ** -0.5
        u = (g * jnp.expand_dims(row_factor, f.cols)
             * jnp.expand_dims(v_col ** -0.5, f.rows))
      else:
        v = decay * v + (1 - decay) * g2
        u = g * v ** -0.5
      if clipping_threshold is not None:
        u = u / jnp.maximum(1.0, _rms(u, f.averaging) / clipping_threshold)
      if multiply_by_parameter_scale:
        u = u * jnp.maximum(_rms(p.astype(jnp.float32), f.averaging), min_parameter_scale)
      for key, value in (("u", u.astype(p.dtype)), ("v_row", v_row), ("v_col", v_col),
                         ("v", v)):
        out[key].append(value)
    trees = {k: jax.tree_util.tree_unflatten(treedef, v) for k, v in out.items()}
    return trees.pop("u"), ScaleByAdafactorState(count=optax.safe_increment(state.count),
                                                 **trees)

  return optax.GradientTransformation(init, update)


# --- sparse upcycling: an expert weight's statistics from its dense kernel's ------------------


def second_moment(v_row: jax.Array, v_col: jax.Array, v: jax.Array,
                  shape: Sequence[int]) -> jax.Array:
  """A rank <= 2 param's second-moment estimate [shape] from its statistics: v when kept whole,
  else Adafactor's rank-1 estimate v_row (x) v_col / mean(v_row). Such a param always has the
  classic factoring (its two dims by size), whatever its names (see `factoring`)."""
  if tuple(v.shape) == tuple(shape) or len(shape) < 2:
    return v
  if len(shape) > 2:
    raise ValueError(f"second_moment takes params of rank <= 2, not {tuple(shape)}")
  f = factoring(shape, None, min_dim_size_to_factor=1)
  return (jnp.expand_dims(v_row, f.cols) * jnp.expand_dims(v_col, f.rows)
          / jnp.mean(v_row))


def tiled_statistics(v: jax.Array, num_experts: int, axes: Sequence[str | None],
                     fresh: Mapping[str, jax.Array], *, name: str = ""
                     ) -> dict[str, jax.Array]:
  """{'v_row', 'v_col', 'v'} of an expert weight [e, ...] whose experts all start from one dense
  kernel [...] with second moment `v` (second_moment), as `init` shapes them for its logical
  axes under FACTOR_RULES: e copies of v's means over the column dims and over the row dims
  (or of v itself when not factored). fresh: the statistics `init` made for it, whose shapes
  say whether it is factored; a shape that FACTOR_RULES do not explain raises ValueError."""
  shape = (num_experts, *v.shape)
  factored = tuple(fresh["v"].shape) == (1,) and len(shape) > 1
  f = factoring(shape, tuple(axes), factored=factored, name=name)
  tiled = jnp.broadcast_to(v[None], shape)
  placeholder = jnp.zeros((1,), jnp.float32)
  out = ({"v_row": jnp.mean(tiled, axis=f.cols), "v_col": jnp.mean(tiled, axis=f.rows),
          "v": placeholder} if f.factored else
         {"v_row": placeholder, "v_col": placeholder, "v": tiled})
  for key, value in out.items():
    if value.shape != fresh[key].shape:
      raise ValueError(f"adafactor {key} of {name or shape} has shape {fresh[key].shape}, not "
                       f"{value.shape} as FACTOR_RULES give: optimizer state upcycling takes "
                       "the default factor rules")
  return out
