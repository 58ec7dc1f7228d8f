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

from moe_jax import config, optimizers, partitioning, restore, run_config, trainer
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
                         optimizers.adafactor)


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
  """A real orbax checkpoint of t5_tiny after 2 train steps, params stored in bfloat16."""
  path = str(tmp_path_factory.mktemp("dense"))
  tr = trainer.Trainer(_model("t5_tiny.gin"), partitioning.Partitioner(), SHAPES,
                       optimizers.adafactor)
  state = tr.init_state(seed=1)
  rng = np.random.default_rng(0)
  batch = {k: (np.ones(s, np.float32) if "weights" in k else rng.integers(1, 256, s))
           for k, s in SHAPES.items()}
  for _ in range(2):
    state, _ = tr.train_step(state, batch, 0.01)
  manager = orbax_utils.make_manager(path)
  orbax_utils.save(manager, 0, params=state.params, data_state={}, params_dtype=jnp.bfloat16,
                   train_state={"step": state.step, "rng": state.rng,
                                "opt_state": state.opt_state})
  manager.wait_until_finished()
  manager.close()
  return path


def _upcycle(tr, dense_dir, model_dir):
  """The trainer's start with initial_checkpoint_mode='upcycle' and an empty MODEL_DIR."""
  return restore.restore_or_init(
      tr, None, model_dir=model_dir, seed=3,
      restore_cfg=run_config.RestoreCheckpointConfig(path=dense_dir, mode="upcycle"))


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
def test_upcycling_creates_each_expert_on_its_own_devices(dense_dir, mesh_shape, tmp_path):
  tr = _moe_trainer(mesh_shape)
  x = mesh_shape[1]
  dense = _stored(f"{dense_dir}/checkpoint_0")
  abstract_dense, _ = orbax_utils.upcycle_target(
      orbax_utils.params_metadata(dense_dir)[0], tr.abstract_params)
  dense_opt = orbax_utils.restore_opt_state_for_upcycle(dense_dir, abstract_dense)
  compiled = tr.compile_init(dense=abstract_dense, dense_opt_state=dense_opt)
  del dense_opt
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
  # The dense run's Adafactor state carried over: its step count, the copied params' statistics,
  # each expert's those of its dense kernel (factored alike here: [m] rows, [h] columns).
  stored_opt = ocp.StandardCheckpointer().restore(f"{dense_dir}/checkpoint_0/train_state")
  want = _flat(stored_opt["opt_state"][0])
  got = _flat(state.opt_state[0]._asdict())
  assert int(got["count"]) == int(want["count"]) == 2
  for key, value in got.items():
    param = key.split("/", 1)[-1]
    if param in tiled and not key.startswith("v/"):  # v: a [1] placeholder (factored)
      assert value.sharding.spec[0] == "expert"
      np.testing.assert_allclose(np.asarray(value),
                                 np.tile(want[key][None], (NUM_EXPERTS, 1)), rtol=1e-5)
    elif key in want:
      np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)
  assert all(np.asarray(got[f"{k}/{s}/layers_1/mlp/router/w"]).max() == 0
             for k in ("v_row", "v_col", "v") for s in ("encoder", "decoder"))


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
    state, _, resumed = restore.restore_or_init(
        tr, None, model_dir=str(tmp_path / "moe"), seed=0,
        restore_cfg=run_config.RestoreCheckpointConfig())
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
      state, _, resumed = restore.restore_or_init(
          tr, None, model_dir=str(tmp_path / f"ft_{source}"), seed=0,
          restore_cfg=run_config.RestoreCheckpointConfig(path=str(tmp_path / source),
                                                         mode=mode))
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


@pytest.mark.parametrize("m,h", [(128, 256), (128, 128), (16, 24)])
def test_upcycled_optimizer_state_is_the_moe_optimizers_after_the_dense_gradients(m, h):
  """Reference: the MoE model's own Adafactor, run from step 0 on the dense run's gradients
  given to every expert, holds the statistics the upcycled state must start with, and takes
  the same next step. (128, 256): dense and expert kernels factored alike; (128, 128): the
  square wo's dense factoring has rows and columns swapped against the expert's; (16, 24): the
  dense kernels are too small to factor, the experts are factored (they have a batch dim)."""
  e, steps = 4, 3
  rng = np.random.default_rng(0)
  dense_axes = {"mlp": {"wi": P("embed", "mlp"), "wo": P("mlp", "embed")}, "norm": P("embed")}
  moe_axes = {"mlp": {"wi": P("expert", "embed", "expert_mlp"),
                      "wo": P("expert", "expert_mlp", "embed"),
                      "router": {"w": P("embed", "unmodeled")}}, "norm": P("embed")}
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  dense = {"mlp": {"wi": normal(m, h), "wo": normal(h, m)}, "norm": normal(m)}
  tile = lambda x: jnp.broadcast_to(x[None], (e, *x.shape))  # noqa: E731
  as_moe = lambda d: {"mlp": {"wi": tile(d["mlp"]["wi"]), "wo": tile(d["mlp"]["wo"]),  # noqa: E731
                              "router": {"w": jnp.zeros((m, e))}}, "norm": d["norm"]}
  grads = [jax.tree.map(lambda x: normal(*x.shape), dense) for _ in range(steps + 1)]
  dense_tx, moe_tx = optimizers.adafactor(dense_axes), optimizers.adafactor(moe_axes)
  dense_state, moe_state = dense_tx.init(dense), moe_tx.init(as_moe(dense))
  for g in grads[:steps]:
    _, dense_state = dense_tx.update(g, dense_state, dense)
    _, moe_state = moe_tx.update(as_moe(g), moe_state, as_moe(dense))
  assert [leaf.shape for leaf in jax.tree.leaves(dense_state)] != [
      leaf.shape[1:] for leaf in jax.tree.leaves(moe_state)]  # not a plain tiling

  moe = as_moe(dense)
  sources = orbax_utils.upcycle_sources(dense, moe)
  upcycled = jax.jit(lambda d, f, p: orbax_utils.upcycle_opt_state(d, f, p, moe_axes, sources))(
      dense_state, moe_tx.init(moe), moe)
  want, got = _flat(moe_state[0]._asdict()), _flat(upcycled[0]._asdict())
  assert int(got["count"]) == steps
  for key, value in want.items():
    if "router" not in key:
      np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
  next_want, _ = moe_tx.update(as_moe(grads[-1]), moe_state, moe)
  next_got, _ = moe_tx.update(as_moe(grads[-1]), upcycled, moe)
  for key, value in _flat(next_want).items():
    if "router" not in key:
      np.testing.assert_allclose(_flat(next_got)[key], value, rtol=1e-5, err_msg=key)
  dense_next, _ = dense_tx.update(grads[-1], dense_state, dense)
  if (m, h) != (16, 24):  # the same factoring: each expert takes the dense model's step
    for name in ("wi", "wo"):
      for j in range(e):
        np.testing.assert_allclose(_flat(next_got)[f"mlp/{name}"][j], dense_next["mlp"][name],
                                   rtol=1e-5, atol=1e-7)

  adamw = optimizers.adamw(dense_axes).init(dense)
  with pytest.raises(ValueError, match="trained with another optimizer"):
    orbax_utils.upcycle_opt_state(adamw, moe_tx.init(moe), moe, moe_axes, sources)


def test_upcycling_a_checkpoint_without_optimizer_state_starts_a_fresh_one(dense_dir, tmp_path):
  """A params-only dense checkpoint (the HF converter's writer) upcycles with a fresh state."""
  hf_switch.save_params(flax.traverse_util.unflatten_dict(_stored(f"{dense_dir}/checkpoint_0"),
                                                          sep="/"), str(tmp_path / "hf"))
  state, _, _ = _upcycle(_moe_trainer((1, 8, 1)), str(tmp_path / "hf"), str(tmp_path / "up"))
  assert int(state.opt_state[0].count) == 0
  assert all(np.asarray(x).max() == 0 for x in jax.tree.leaves(state.opt_state[0].v_row))
