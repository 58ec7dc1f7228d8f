"""Memory planner: per-device bytes of a gin model's training step on a mesh of any size.

  python scripts/plan.py --gin_file=gin/models/switch_base.gin --mesh=data:32,expert:8,model:1 \\
      --hbm_gib=16 [--batch_size=256 --inputs_length=512 --targets_length=114]

Nothing is allocated or compiled: the model and the optimizer state are built with
jax.eval_shape on an AbstractMesh, so 256 or 2048 devices plan on a laptop. Prints params,
gradients and Adafactor state per device, one MoE layer's dispatch mask / combine weights /
expert inputs and hidden, the all-to-all bytes per step, the peak of the start of a run
(restart, sparse upcycling) and whether it fits the HBM.
The arithmetic lives in moe_jax.memory_planner (plan_memory, moe_layer_bytes).

--compile upcycle (or fresh; repeatable) also compiles that start step of the trainer
(Trainer.compile_init) for the mesh on as many simulated CPU devices, ahead of time: nothing
runs, and its memory analysis is printed beside the plan. Arguments and outputs are what a TPU
or GPU holds too; XLA:CPU's temporaries differ from theirs. Upcycling switch_base on 256
devices compiles in about 10 s; a fresh init of it in about a minute.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_jax import config, memory_planner, optimizers, partitioning, trainer
from moe_jax.checkpoints import orbax_utils

START_STEPS = ("fresh", "upcycle")
OPTIMIZERS = {"adafactor": optimizers.adafactor, "adamw": optimizers.adamw}


def optimizer_for(name: str, boxed_params: Any) -> optax.GradientTransformation:
  """The trainer's optimizer `name` (defaults) for the boxed (logically named) params."""
  if name not in OPTIMIZERS:
    raise ValueError(f"--optimizer={name!r}: expected adafactor or adamw")
  return OPTIMIZERS[name](nn.get_partition_spec(boxed_params))


def upcycle_trees(params: Any) -> tuple[Any, Any]:
  """(dense leaves as restored, MoE leaves drawn fresh) of sparse upcycling into a MoE model
  from its dense counterpart; params: ShapeDtypeStructs with shardings."""
  dense, sources = orbax_utils.upcycle_target(orbax_utils.dense_shapes(params), params)
  flat = flax.traverse_util.flatten_dict(params)
  return dense, flax.traverse_util.unflatten_dict(
      {path: leaf for path, leaf in flat.items() if path not in sources})


def compile_start(model: Any, mesh: str, steps: Sequence[str], shapes: dict[str, tuple],
                  optimizer: str) -> dict[str, Any]:
  """{step: memory_analysis()} of the trainer's start steps ('fresh', 'upcycle') compiled for
  `mesh` on simulated CPU devices (nothing runs)."""
  shape = partitioning.parse_mesh(mesh)
  devices = jax.devices("cpu")
  if len(devices) < math.prod(shape):
    raise ValueError(f"--compile: the mesh has {math.prod(shape)} devices but JAX has "
                     f"{len(devices)} CPU devices (it was started before plan.py could ask "
                     "for more)")
  part = partitioning.Partitioner(mesh_shape=shape, devices=devices[:math.prod(shape)])
  tr = trainer.Trainer(model, part, shapes, OPTIMIZERS[optimizer])
  out = {}
  for step in steps:
    dense = upcycle_trees(tr.abstract_params)[0] if step == "upcycle" else None
    out[step] = tr.compile_init(dense=dense).memory_analysis()
  return out


def build_plan(gin_files: Sequence[str], mesh: str, *, batch_size: int, inputs_length: int,
               targets_length: int, optimizer: str = "adafactor", hbm_gib: float | None = None,
               gin_bindings: Sequence[str] = (), compile_steps: Sequence[str] = ()
               ) -> memory_planner.MemoryPlan:
  """Parse the model gin, trace it abstractly on `mesh` ('data:32,expert:8,model:1');
  compile_steps: START_STEPS to compile too (see compile_start)."""
  part = partitioning.Partitioner.abstract(mesh)
  x = part.num_expert_partitions
  part.validate(batch_size=batch_size)
  # The MoE layers' groups come in multiples of the mesh's partitions, as in training.
  model = config.build_model(gin_files, [*gin_bindings, f"NUM_EXPERT_PARTITIONS = {x}"])
  shapes = {"encoder_input_tokens": (batch_size, inputs_length),
            "decoder_input_tokens": (batch_size, targets_length)}
  variables = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes),
                             jax.random.key(0))
  params = variables["params"]
  batch = {
      "encoder_input_tokens": jax.ShapeDtypeStruct((batch_size, inputs_length), jnp.int32),
      "decoder_input_tokens": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.int32),
      "decoder_target_tokens": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.int32),
      "decoder_loss_weights": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.float32),
  }
  # A training step: rng given -> train capacity factor, as the trainer's loss.
  layers = memory_planner.moe_geometries(model.loss_fn, nn.unbox(params), batch,
                                       jax.random.key(0), batch_partitions=part.batch_partitions)
  for layer in layers:
    part.validate(num_experts=layer.num_experts, num_groups=layer.num_groups)
  hbm = None if hbm_gib is None else int(hbm_gib * 2**30)
  dense = fresh = None
  if layers:
    sharded = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           nn.unbox(params), part.params_shardings(params))
    dense, fresh = upcycle_trees(sharded)
  plan = memory_planner.plan_memory(part, params, optimizer_for(optimizer, params), layers, hbm,
                                  upcycle_dense=dense, upcycle_fresh=fresh)
  if compile_steps:
    plan.compiled = compile_start(model, mesh, compile_steps,
                                  trainer.batch_shapes({"inputs": inputs_length,
                                                        "targets": targets_length},
                                                       batch_size, pack=False), optimizer)
  return plan


def main(argv: Sequence[str] | None = None) -> memory_planner.MemoryPlan:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", required=True, dest="gin_files")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra binding, e.g. 'NUM_EXPERTS = 64' (repeatable)")
  parser.add_argument("--mesh", required=True, help="e.g. data:32,expert:8,model:1")
  parser.add_argument("--hbm_gib", type=float, default=None, help="HBM per device (GiB)")
  parser.add_argument("--batch_size", type=int, default=256, help="global batch (sequences)")
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--targets_length", type=int, default=114)
  parser.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
  parser.add_argument("--compile", action="append", default=[], choices=START_STEPS,
                      help="also compile this start step for the mesh on simulated CPU "
                           "devices and print its memory analysis (repeatable)")
  args = parser.parse_args(argv)
  try:
    if args.compile:
      _simulate_cpu_devices(math.prod(partitioning.parse_mesh(args.mesh)))
    plan = build_plan(args.gin_files, args.mesh, batch_size=args.batch_size,
                      inputs_length=args.inputs_length, targets_length=args.targets_length,
                      optimizer=args.optimizer, hbm_gib=args.hbm_gib,
                      gin_bindings=args.gin_bindings, compile_steps=args.compile)
  except ValueError as e:
    print(f"plan.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{', '.join(args.gin_files)}: batch {args.batch_size} x (inputs {args.inputs_length}, "
        f"targets {args.targets_length}), {args.optimizer}")
  print(plan.report())
  return plan


def _simulate_cpu_devices(count: int) -> None:
  """Ask for `count` CPU devices; only possible before JAX starts its backends (in a process
  that already did, compile_start says how many it has)."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass


if __name__ == "__main__":
  main()
