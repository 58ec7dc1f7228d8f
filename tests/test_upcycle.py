"""Sparse upcycling and the other ways a run starts (restart, fine-tune restore, eval restore),
on 8 simulated devices: values against a NumPy tiling of the dense checkpoint, and a per-device
memory bound that gathering any one expert weight would break.

The bound is checked three ways: the compiled start step's memory analysis (arguments + outputs
+ temporaries per device), every jax.Array any Python function returned while the path ran
(orbax's per-shard reads, eager ops; jit outputs created in C++ are covered by the memory
analysis), and the arrays the path left alive.
"""
import contextlib
import gc
import math
import os
import sys
import threading

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from moe_jax import config, partitioning, trainer
from moe_jax.checkpoints import hf_switch, orbax_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
NUM_EXPERTS = 64
SHAPES = trainer.batch_shapes({"inputs": 16, "targets": 8}, 8, pack=False)
# Per device, by the size of the 'expert' axis. Upcycling switch_tiny with 64 experts peaks at
# 7.8 MiB (8 expert partitions) or 11.8 MiB (4): params and optimizer state hold 1/X of every
# expert weight, plus the dense checkpoint (an argument, bfloat16). One whole expert weight
# [64, 128, 256] is 8 MiB: gathering any of them breaks the budget (checked in _check_bound).
BUDGET = {8: 10 * MiB, 4: 14 * MiB}


def _model(gin_file, *bindings):
  gin.clear_config()
  model = config.build_model([os.path.join(ROOT, "gin", "models", gin_file)],
                             ["VOCAB_SIZE = 256", *bindings])
  gin.clear_config()
  return model


def _moe_trainer(mesh_shape):
  model = _model("switch_tiny.gin", f"NUM_EXPERTS = {NUM_EXPERTS}",
                 f"NUM_EXPERT_PARTITIONS = {mesh_shape[1]}")
  return trainer.Trainer(model, partitioning.Partitioner(mesh_shape=mesh_shape), SHAPES,
                         trainer.adafactor)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _stored(step_dir):
  """A checkpoint's params as float32 NumPy arrays, read without a target."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))
  return {k: np.asarray(v, np.float32) for k, v in _flat(tree).items()}


def _shard_bytes(array):
  """Bytes of one device's shard (read off the sharding: touching shards creates arrays)."""
  return math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize


def _per_device(arrays):
  """Largest number of bytes any one device holds of these arrays' shards."""
  totals = {}
  for array in arrays:
    for device in array.sharding.addressable_devices:
      totals[device] = totals.get(device, 0) + _shard_bytes(array)
  return max(totals.values(), default=0)


@contextlib.contextmanager
def _watch_arrays():
  """{'largest': bytes of the largest per-device shard of any jax.Array (or list / tuple of
  them) a Python function returned inside the block, in this thread or one started inside it;
  'left': the arrays created inside the block that are still alive at its end}."""
  gc.collect()
  before = jax.live_arrays()  # held, so that no new array can take an old one's id
  seen = {"largest": 0}

  def largest_shard(value):
    values = value if isinstance(value, (list, tuple)) else (value,)
    return max((_shard_bytes(v) for v in values
                if isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)
                and not v.is_deleted()), default=0)

  def profile(frame, event, arg):
    if event == "return" and arg is not None:
      seen["largest"] = max(seen["largest"], largest_shard(arg))

  sys.setprofile(profile)
  threading.setprofile(profile)
  try:
    yield seen
  finally:
    sys.setprofile(None)
    threading.setprofile(None)
  gc.collect()
  old = {id(a) for a in before}
  seen["left"] = [a for a in jax.live_arrays() if id(a) not in old]


def _step_peak(compiled):
  stats = compiled.memory_analysis()
  return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def _check_bound(tr, state_or_params, watched, compiled=None):
  """The per-device bound, and that it means something: one gathered expert weight breaks it."""
  budget = BUDGET[tr.partitioner.num_expert_partitions]
  leaves = jax.tree.leaves(state_or_params)
  largest_leaf_shard = max(_shard_bytes(x) for x in leaves)
  expert_weight = max(x.size * x.dtype.itemsize for k, x in _flat(tr.abstract_params).items()
                      if k.endswith(("/wi", "/wo")) and len(x.shape) == 3)
  assert _per_device(leaves) + expert_weight > budget
  assert watched["largest"] <= largest_leaf_shard < expert_weight
  assert _per_device(watched["left"]) <= budget
  if compiled is not None:
    assert _step_peak(compiled) <= budget


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
  """A real orbax checkpoint of a freshly initialized t5_tiny, params stored in bfloat16."""
  path = str(tmp_path_factory.mktemp("dense"))
  tr = trainer.Trainer(_model("t5_tiny.gin"), partitioning.Partitioner(), SHAPES,
                       trainer.adafactor)
  state = tr.init_state(seed=1)
  manager = orbax_utils.make_manager(path)
  orbax_utils.save(manager, 0, params=state.params, data_state={}, params_dtype=jnp.bfloat16,
                   train_state={"step": state.step, "rng": state.rng,
                                "opt_state": state.opt_state})
  manager.wait_until_finished()
  manager.close()
  return path


def _upcycle(tr, dense_dir, model_dir):
  """The trainer's start with initial_checkpoint_mode='upcycle' and an empty MODEL_DIR."""
  return trainer._restore_or_init(
      tr, None, model_dir=model_dir, seed=3, initial_checkpoint_path=dense_dir,
      initial_checkpoint_mode="upcycle", restore_dataset=False)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
def test_upcycling_creates_each_expert_on_its_own_devices(dense_dir, mesh_shape, tmp_path):
  tr = _moe_trainer(mesh_shape)
  x = mesh_shape[1]
  dense = _stored(f"{dense_dir}/checkpoint_0")
  abstract_dense, _ = orbax_utils.upcycle_target(
      orbax_utils.params_metadata(dense_dir)[0], tr.abstract_params)
  compiled = tr.compile_init(dense=abstract_dense)
  with _watch_arrays() as watched:
    state, source, resumed = _upcycle(tr, dense_dir, str(tmp_path))
  assert source == f"{dense_dir}/checkpoint_0" and not resumed
  _check_bound(tr, state, watched, compiled)
  params = _flat(state.params)
  tiled = [k for k in params if k.endswith(("/wi", "/wo")) and params[k].ndim == 3]
  assert sorted(tiled) == [f"{s}/layers_1/mlp/{n}" for s in ("decoder", "encoder")
                           for n in ("wi", "wo")]
  for key in tiled:
    value = params[key]
    assert value.sharding.spec[0] == "expert"
    assert {s.data.shape[0] for s in value.addressable_shards} == {NUM_EXPERTS // x}
    np.testing.assert_array_equal(np.asarray(value),
                                  np.tile(dense[key][None], (NUM_EXPERTS, 1, 1)), err_msg=key)
  for key, value in params.items():
    if key in dense and key not in tiled:
      np.testing.assert_array_equal(np.asarray(value), dense[key], err_msg=key)
  assert {k for k in params if k not in dense and k not in tiled} == {
      f"{s}/layers_1/mlp/router/w" for s in ("encoder", "decoder")}


def test_restart_finetune_and_eval_restores_stay_sharded(dense_dir, tmp_path):
  tr = _moe_trainer((1, 8, 1))
  state = _upcycle(tr, dense_dir, str(tmp_path / "up"))[0]
  # A restart from a checkpoint of it (params stored in bfloat16, restored as float32).
  manager = orbax_utils.make_manager(str(tmp_path / "moe"))
  orbax_utils.save(manager, 0, params=state.params, data_state={}, params_dtype=jnp.bfloat16,
                   train_state={"step": state.step, "rng": state.rng,
                                "opt_state": state.opt_state})
  manager.wait_until_finished()
  manager.close()
  saved = _stored(f"{tmp_path}/moe/checkpoint_0")
  opt_before = jax.device_get(state.opt_state)
  del state
  with _watch_arrays() as watched:
    state, _, resumed = trainer._restore_or_init(
        tr, None, model_dir=str(tmp_path / "moe"), seed=0, initial_checkpoint_path=None,
        initial_checkpoint_mode="full", restore_dataset=False)
  assert resumed
  _check_bound(tr, state, watched)
  for key, value in _flat(state.params).items():
    assert value.dtype == jnp.float32 and value.sharding == _flat(tr.params_shardings)[key]
    np.testing.assert_array_equal(np.asarray(value), saved[key], err_msg=key)
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(opt_before)):
    np.testing.assert_array_equal(np.asarray(got), want)
  del state

  # Fine-tuning: initial_checkpoint_mode='params' from that checkpoint, and 'full' from a
  # converted HF checkpoint (the converter's writer: params only, from NumPy).
  hf_switch.save_params(flax.traverse_util.unflatten_dict(saved, sep="/"),
                        str(tmp_path / "hf"))
  compiled = tr.compile_init(params=tr.abstract_params)
  for source, mode in (("moe", "params"), ("hf", "full")):
    with _watch_arrays() as watched:
      state, _, resumed = trainer._restore_or_init(
          tr, None, model_dir=str(tmp_path / f"ft_{source}"), seed=0,
          initial_checkpoint_path=str(tmp_path / source), initial_checkpoint_mode=mode,
          restore_dataset=False)
    assert not resumed and int(state.step) == 0
    _check_bound(tr, state, watched, compiled)
    for key, value in _flat(state.params).items():
      assert value.sharding == _flat(tr.params_shardings)[key]
      np.testing.assert_array_equal(np.asarray(value), saved[key], err_msg=key)
    del state

  # Eval / infer restore (restore_for_inference reads params this way).
  with _watch_arrays() as watched:
    params, _ = orbax_utils.restore_params_from_path(f"{tmp_path}/moe", tr.abstract_params)
  _check_bound(tr, params, watched)


def test_upcycle_target_shards_dense_kernels_like_their_experts():
  """With a 'model' axis the dense MLP kernels are read split over it, as their experts are."""
  mesh = AbstractMesh((2, 2, 2), partitioning.MESH_AXES)
  leaf = lambda shape, *spec: jax.ShapeDtypeStruct(  # noqa: E731
      shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))
  moe = {"mlp": {"wi": leaf((4, 8, 16), "expert", None, "model"), "router": {"w": leaf((8, 4))}},
         "norm": leaf((8,))}
  stored = {"mlp": {"wi": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)},
            "norm": jax.ShapeDtypeStruct((8,), jnp.bfloat16),
            "unused": jax.ShapeDtypeStruct((3,), jnp.float32)}
  target, sources = orbax_utils.upcycle_target(stored, moe)
  assert sources == {("mlp", "wi"): ("tiled", ("mlp", "wi")), ("norm",): ("copied", ("norm",))}
  assert target["mlp"]["wi"].sharding.spec == P(None, "model")
  assert target["mlp"]["wi"].dtype == jnp.bfloat16  # cast inside the jitted step
  assert "unused" not in target
  with pytest.raises(ValueError, match="found no dense MLP kernel"):
    orbax_utils.upcycle_target({"norm": stored["norm"]}, moe)
