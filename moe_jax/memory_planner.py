"""Memory planner: per-device bytes of a training step's params, optimizer state and MoE buffers.

The arithmetic works from abstract shapes and a Partitioner's shardings (nothing is allocated),
so tests can check it against real sharded arrays; scripts/plan.py is its command line.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from moe_jax import dispatch as dispatch_lib
from moe_jax import moe_layer
from moe_jax.partitioning import Partitioner, shard_shape

# Logical axes of the einsum dispatch's tensors: the dispatch mask and combine weights [g,s,e,c]
# are split on g like the batch; the expert buffers [e,g,c,m] and hidden [e,g,c,h] as
# moe_jax/dispatch.py constrains them (e over 'expert', g over the data replicas).
MASK_AXES = ("batch", None, None, None)
EXPERT_BUFFER_AXES = dispatch_lib.EXPERT_AXES
EXPERT_HIDDEN_AXES = dispatch_lib.HIDDEN_AXES


@dataclasses.dataclass(frozen=True)
class MoeLayerGeometry:
  """One MoE layer's token buffers in one step (letters as in docs/design.md, section 3)."""
  name: str
  num_groups: int  # g
  group_size: int  # s
  num_experts: int  # e
  capacity: int  # c
  d_model: int  # m
  d_ff: int  # h
  num_wi: int = 1  # 2 for gated activations (wi_0, wi_1)
  dtype_bytes: int = 4  # dispatch mask and expert activations; combine weights are float32
  dispatch: str = "einsum"  # only the einsum dispatch is planned


def moe_geometries(fn: Callable[..., Any], *args: Any, batch_partitions: int = 1,
                   **kwargs: Any) -> list[MoeLayerGeometry]:
  """Every MoeLayer call made by `fn(*args, **kwargs)` (e.g. a model's loss_fn), found by
  tracing it abstractly (jax.eval_shape: nothing is computed or allocated). batch_partitions:
  the mesh's (Partitioner.batch_partitions), which the layers round their groups to."""
  found: list[MoeLayerGeometry] = []

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, moe_layer.MoeLayer) and context.method_name == "__call__":
      b, l, m = call_args[0].shape
      g, s = module.group_shape(b, l, batch_partitions)
      found.append(MoeLayerGeometry(
          name="/".join(module.scope.path), num_groups=g, group_size=s,
          num_experts=module.num_experts,
          capacity=module.expert_capacity(s, bool(call_kwargs["deterministic"])),
          d_model=m, d_ff=module.d_ff, num_wi=len(module.activations),
          dtype_bytes=np.dtype(module.dtype).itemsize,
          # 'auto' is einsum on the accelerators a plan is for (and whenever experts are split).
          dispatch="einsum" if module.dispatch == "auto" else module.dispatch))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(fn, **kwargs), *args)
  return found


def tree_bytes_per_device(abstract_tree: Any, shardings: Any, mesh_sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) with these shardings;
  uneven shards count as the largest one."""
  leaves = jax.tree.leaves(abstract_tree)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  return sum(math.prod(shard_shape(x.shape, spec, mesh_sizes)) * np.dtype(x.dtype).itemsize
             for x, spec in zip(leaves, specs))


def moe_layer_bytes(partitioner: Partitioner, layer: MoeLayerGeometry) -> dict[str, int]:
  """Per-device bytes of one MoE layer's tensors and of its all-to-all traffic.

  dispatch_mask, combine_weights [g,s,e,c]; expert_inputs, expert_outputs [e,g,c,m];
  expert_hidden [e,g,c,h] (x num_wi). all_to_all_forward / all_to_all_backward: bytes one device
  sends (and, symmetrically, receives) over the 'expert' axis: forward the dispatch (g -> e)
  and the combine (e -> g) of an expert buffer; backward their two transposes. Each all-to-all
  keeps 1/X of the block local. (The combine weights' gradient reuses the forward's combined
  expert outputs; for some shapes XLA instead moves that gradient [g,s,e,c] too.)
  """
  sizes = partitioner.mesh_sizes
  x = sizes["expert"]
  spec = partitioner.logical_to_mesh_spec
  g, s, e, c, m, h = (layer.num_groups, layer.group_size, layer.num_experts, layer.capacity,
                      layer.d_model, layer.d_ff)
  count = lambda shape, axes: math.prod(shard_shape(shape, spec(axes), sizes))  # noqa: E731
  if layer.dispatch != "einsum":
    raise ValueError(f"the planner models the einsum dispatch, not {layer.dispatch!r} "
                     f"({layer.name})")
  mask = count((g, s, e, c), MASK_AXES)
  buffer = count((e, g, c, m), EXPERT_BUFFER_AXES) * layer.dtype_bytes
  sent = lambda block: block * (x - 1) // x  # noqa: E731
  return {
      "dispatch_mask": mask * layer.dtype_bytes,
      "combine_weights": mask * 4,
      "expert_inputs": buffer,
      "expert_hidden": count((e, g, c, h), EXPERT_HIDDEN_AXES) * layer.dtype_bytes * layer.num_wi,
      "expert_outputs": buffer,
      "all_to_all_forward": 2 * sent(buffer),
      "all_to_all_backward": 2 * sent(buffer),
  }


def compiled_peak(stats: Any) -> int:
  """Per-device peak of a compiled step from its `memory_analysis()`: arguments + outputs
  (less those aliased to arguments) + temporaries."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


@dataclasses.dataclass
class MemoryPlan:
  """Per-device memory of a training step and of the start of a run (bytes).

  upcycle_dense, upcycle_fresh: sparse upcycling's dense leaves as restored and the leaves it
  draws fresh (routers); None for a model without experts. compiled: step name -> the
  `memory_analysis()` of that start step compiled for the mesh (scripts/plan.py --compile).
  """
  mesh: dict[str, int]
  params: int
  grads: int
  opt_state: int
  moe_layers: list[tuple[MoeLayerGeometry, dict[str, int]]]
  hbm_bytes: int | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  upcycle_dense: int | None = None
  upcycle_fresh: int = 0
  compiled: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def moe_activations(self) -> int:
    """MoE tensors of all layers kept for the backward pass (no rematerialization)."""
    keys = ("dispatch_mask", "combine_weights", "expert_inputs", "expert_hidden", "expert_outputs")
    return sum(b[k] for _, b in self.moe_layers for k in keys)

  @property
  def all_to_all_per_step(self) -> int:
    return sum(b["all_to_all_forward"] + b["all_to_all_backward"] for _, b in self.moe_layers)

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt_state + self.moe_activations

  @property
  def restore_peak(self) -> int:
    """A restart or a restore for fine-tuning: orbax reads each device's shards straight into
    it and a fresh optimizer state is created in its sharding, so params + optimizer state."""
    return self.params + self.opt_state

  @property
  def upcycle_peak(self) -> int | None:
    """Sparse upcycling's jitted step: the dense leaves (its arguments), the MoE params and
    optimizer state (its outputs), and the routers' random-number temporaries, counted as three
    times the routers (threefry's counters and bits, then the float draw). The dense optimizer
    state carried over is left out: with Adafactor, factored vectors (switch_tiny upcycled to 64
    experts on 8 devices: +0.42 MiB on 7.8 MiB compiled)."""
    if self.upcycle_dense is None:
      return None
    return self.upcycle_dense + self.params + self.opt_state + 3 * self.upcycle_fresh

  @property
  def peak(self) -> int:
    """The largest of the training step's total and the start of a run's planned peaks."""
    return max(self.total, self.restore_peak, self.upcycle_peak or 0)

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.peak <= self.hbm_bytes

  def report(self) -> str:
    gib = lambda b: f"{b / 2**30:9.3f} GiB"  # noqa: E731
    mib = lambda b: f"{b / 2**20:9.2f} MiB"  # noqa: E731
    row = lambda label, value: f"  {label:<40}{value}"  # noqa: E731
    n = len(self.moe_layers)
    mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
    lines = [f"mesh {mesh} = {math.prod(self.mesh.values())} devices; per device:",
             row("params", gib(self.params)),
             row("gradients", gib(self.grads)),
             row("optimizer state", gib(self.opt_state)),
             row(f"MoE activations ({n} layers)", gib(self.moe_activations)),
             row("total", gib(self.total) + "  (not counted: attention / dense activations, "
                 "XLA temporaries)")]
    lines += ["  start of a run (peak):",
              row("  restart / restore for fine-tuning",
                  gib(self.restore_peak) + "  (params + optimizer state)")]
    if self.upcycle_peak is not None:
      lines.append(row("  sparse upcycling", gib(self.upcycle_peak) + "  (+ dense checkpoint "
                       f"{self.upcycle_dense / 2**30:.3f} GiB, routers' RNG "
                       f"{3 * self.upcycle_fresh / 2**30:.3f} GiB)"))
    lines.append(row("  fresh initialization", gib(self.restore_peak) + "  + RNG temporaries "
                     "(device-dependent: --compile fresh)"))
    for name, stats in self.compiled.items():
      lines.append(row(f"  compiled {name} step", gib(compiled_peak(stats)) + (
          f"  (arguments {stats.argument_size_in_bytes / 2**30:.3f} + outputs "
          f"{stats.output_size_in_bytes / 2**30:.3f} + temporaries "
          f"{stats.temp_size_in_bytes / 2**30:.3f} GiB)")))
    if self.hbm_bytes is not None:
      verdict = "fits" if self.fits else "does NOT fit"
      lines.append(f"  {verdict} in {self.hbm_bytes / 2**30:g} GiB HBM "
                   f"({100 * self.peak / self.hbm_bytes:.0f}% used at the peak)")
    if self.moe_layers:
      lines.append(row(f"all-to-all per step ({n} layers)",
                       gib(self.all_to_all_per_step) + " sent (as much received), fwd + bwd"))
      geometry, b = max(self.moe_layers, key=lambda lb: lb[1]["expert_inputs"])
      lines += [
          f"  largest MoE layer {geometry.name}: g={geometry.num_groups} s={geometry.group_size} "
          f"e={geometry.num_experts} c={geometry.capacity} m={geometry.d_model} h={geometry.d_ff}",
          row("  dispatch mask [g,s,e,c]", mib(b["dispatch_mask"])),
          row("  combine weights [g,s,e,c]", mib(b["combine_weights"])),
          row("  expert inputs [e,g,c,m]", mib(b["expert_inputs"])),
          row("  expert hidden [e,g,c,h]", mib(b["expert_hidden"])),
          row("  all-to-all sent forward", mib(b["all_to_all_forward"])),
          row("  all-to-all sent backward", mib(b["all_to_all_backward"]))]
    lines += [f"  note: {note}" for note in self.notes]
    return "\n".join(lines)


def plan_memory(partitioner: Partitioner, abstract_params: Any,
                optimizer: optax.GradientTransformation,
                moe_layers: Sequence[MoeLayerGeometry] = (),
                hbm_bytes: int | None = None, upcycle_dense: Any = None,
                upcycle_fresh: Any = None) -> MemoryPlan:
  """Per-device memory of training with `optimizer` on `partitioner`'s mesh (abstract is fine).

  abstract_params: jax.eval_shape of the init, with logical partitioning boxes (the tree given
  to the optimizer, e.g. variables['params']). upcycle_dense, upcycle_fresh: for sparse
  upcycling, the dense leaves as restored and the MoE leaves drawn fresh, as ShapeDtypeStructs
  with shardings (orbax_utils.upcycle_target).
  """
  shardings = partitioner.params_shardings(abstract_params)
  values = nn.unbox(abstract_params)
  opt_shardings = partitioner.opt_state_shardings(optimizer, abstract_params, shardings)
  sizes = partitioner.mesh_sizes
  params = tree_bytes_per_device(values, shardings, sizes)
  n = partitioner.batch_partitions
  uneven = sorted({layer.num_groups for layer in moe_layers if layer.num_groups % n})
  notes = [f"num_groups={g} does not split evenly over the {n} batch partitions "
           "(data x expert): shards are padded; a multiple of it (or group_size) uses every "
           "device" for g in uneven]
  # Under an expert axis XLA turns the indices dispatch's scatter / gather into all-gathers
  # of the tokens, and dropless moves tokens by all-gather / reduce-scatter: neither fits this
  # all-to-all model.
  unplanned = [f"{layer.name} ({layer.dispatch})" for layer in moe_layers
               if layer.dispatch != "einsum"]
  if unplanned:
    notes.append(f"MoE layers not counted (only the einsum dispatch is planned): "
                 f"{', '.join(unplanned)}")
  return MemoryPlan(
      mesh=sizes, params=params, grads=params,
      opt_state=tree_bytes_per_device(jax.eval_shape(optimizer.init, values), opt_shardings,
                                      sizes),
      moe_layers=[(layer, moe_layer_bytes(partitioner, layer)) for layer in moe_layers
                  if layer.dispatch == "einsum"],
      hbm_bytes=hbm_bytes, notes=notes,
      upcycle_dense=None if upcycle_dense is None else _sharded_bytes(upcycle_dense, sizes),
      upcycle_fresh=0 if upcycle_fresh is None else _sharded_bytes(upcycle_fresh, sizes))


def _sharded_bytes(tree: Any, mesh_sizes: Mapping[str, int]) -> int:
  """tree_bytes_per_device of ShapeDtypeStructs that carry their shardings."""
  return tree_bytes_per_device(tree, jax.tree.map(lambda x: x.sharding, tree), mesh_sizes)
