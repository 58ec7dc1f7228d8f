"""moe_jax models trained, evaluated, resumed and decoded by t5x itself (moe_jax/t5x_bridge.py).

The references are t5x's own code: its MoeTrainer, Adafactor (with t5x.contrib.moe's factor
rules), rsqrt schedule, MoePjitPartitioner and its train / eval / infer command lines. Needs
MOE_JAX_T5X_PATH (os.pathsep-separated dirs holding t5x, airio, jestimator, flaxformer).
"""
import json
import os
import pathlib
import subprocess
import sys

import flax
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

T5X_PATH = [p for p in os.environ.get("MOE_JAX_T5X_PATH", "").split(os.pathsep) if p]
if not T5X_PATH or not all(os.path.isdir(p) for p in T5X_PATH):
  pytest.skip("MOE_JAX_T5X_PATH (dirs holding t5x, airio, jestimator, flaxformer) is not set",
              allow_module_level=True)
sys.path[:0] = [p for p in T5X_PATH if p not in sys.path]

from t5x import utils as t5x_utils  # noqa: E402
from t5x.contrib.moe import partitioning as moe_partitioning  # noqa: E402
from t5x.contrib.moe import trainer as moe_trainer  # noqa: E402

from moe_jax import config, optimizers, partitioning, t5x_bridge, trainer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# switch_tiny's architecture, smaller. Dropout is 0 in switch_tiny and the jitter is off, so a
# training step is deterministic on both sides and the two trainers see the same function.
# 8 groups in every MoE layer whatever the mesh (t5x's pjit context sets no abstract mesh, so
# the layer cannot read the batch partitions there), capacity factor 1 so some tokens drop.
SMALL = ["EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
         "ROUTER_JITTER_NOISE = 0.0", "TRAIN_CAPACITY_FACTOR = 1.0", "MIN_EXPERT_CAPACITY = 1",
         "ROUTER_Z_LOSS_FACTOR = 0.001", "moe_layer.MoeLayer.num_groups = 8"]
B, LE, LD = 8, 32, 16
STEPS = 3
LEARNING_RATE, WARMUP = 0.1, 2  # lr = 0.1 / sqrt(max(step, 2)): changes over the steps


def batches(n: int) -> list[dict[str, np.ndarray]]:
  """Random token batches with padding (so the real-token normalization matters)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    b = {k: rng.integers(2, 2000, (B, length)).astype(np.int32)
         for k, length in (("encoder_input_tokens", LE), ("decoder_input_tokens", LD),
                           ("decoder_target_tokens", LD))}
    for row in range(B):
      b["encoder_input_tokens"][row, rng.integers(LE // 2, LE):] = 0
      b["decoder_target_tokens"][row, rng.integers(LD // 2, LD):] = 0
    b["decoder_loss_weights"] = (b["decoder_target_tokens"] > 0).astype(np.float32)
    out.append(b)
  return out


SHAPES = {"encoder_input_tokens": (B, LE), "decoder_input_tokens": (B, LD),
          "decoder_target_tokens": (B, LD), "decoder_loss_weights": (B, LD)}
TYPES = {k: (np.float32 if k == "decoder_loss_weights" else np.int32) for k in SHAPES}


def moe_partitioner(data: int, expert: int) -> moe_partitioning.MoePjitPartitioner:
  """t5x's MoePjitPartitioner on a (data, expert, model=1) mesh of the 8 devices. t5x derives
  its mesh from the TPU topology and on CPU puts every device on 'model'; this gives it the
  mesh its default_moe_mesh builds for `data` × `expert` TPU cores, with CPU devices."""
  partitioner = moe_partitioning.MoePjitPartitioner(num_expert_partitions=expert,
                                                    num_partitions=1)
  devices = np.asarray(jax.devices()[:data * expert]).reshape(data, expert, 1)
  partitioner.mesh = Mesh(devices, ("data", "expert", "model"))  # a cached_property
  return partitioner


def t5x_trainer(model, partitioner, num_expert_partitions: int):
  """t5x's MoeTrainer over a fresh train state (t5x's initializer, seed 0)."""
  init = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=SHAPES, input_types=TYPES, partitioner=partitioner)
  state = init.from_scratch(jax.random.PRNGKey(0))
  schedule = t5x_utils.create_learning_rate_scheduler(
      factors="constant * rsqrt_decay", base_learning_rate=LEARNING_RATE, warmup_steps=WARMUP)
  return moe_trainer.MoeTrainer(
      model=model, train_state=state, partitioner=partitioner, eval_names=[], summary_dir=None,
      train_state_axes=init.train_state_axes, rng=jax.random.PRNGKey(1),
      learning_rate_fn=schedule, num_microbatches=None,
      num_expert_partitions=num_expert_partitions)


def t5x_step(t5x: moe_trainer.MoeTrainer, batch) -> float:
  return float(t5x.train(iter([batch]), 1).result()["loss"].value)


def flat(params) -> dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def test_same_parameter_tree_as_moe_jax():
  """The bridge's initial params are moe_jax's, name for name and value for value, and t5x's
  'params_axes' carry the logical names moe_jax boxes them with."""
  reference = config.build_model(["models/switch_tiny.gin"], SMALL)
  bridge = config.build_model(["t5x/switch_tiny.gin"], SMALL)
  key = jax.random.PRNGKey(0)
  ours = reference.get_initial_variables(key, SHAPES)["params"]
  theirs = bridge.get_initial_variables(key, SHAPES)
  want, got = flat(nn.unbox(ours)), flat(theirs["params"])
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  names = {"/".join(k): tuple(v) for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(nn.get_partition_spec(ours))).items()}
  axes = {"/".join(k)[:-len("_axes")]: v.names for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(theirs["params_axes"])).items()}
  assert axes == names
  assert axes["encoder/layers_1/mlp/wi"] == ("expert", "embed", "expert_mlp")


def test_every_t5x_gin_has_its_moe_jax_model():
  """Each gin/t5x model file builds t5x's model (MoE or dense class by the file) over exactly
  the parameter tree of the moe_jax model gin it includes (abstract: no memory)."""
  names = sorted(p.name for p in (REPO / "gin" / "t5x").glob("*.gin")
                 if p.name not in ("moe.gin", "dense.gin"))
  assert {"switch_base.gin", "switch_base_8.gin", "switch_large.gin", "switch_xxl.gin",
          "switch_c.gin", "gshard_top2_base.gin", "t5_base.gin"} <= set(names)
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}

  def tree(gin_file: str, boxed: bool) -> dict[str, tuple[int, ...]]:
    model = config.build_model([gin_file], ["VOCAB_SIZE = 2100"])
    params = jax.eval_shape(
        lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    params = nn.unbox(params) if boxed else params
    gin.clear_config()
    return model, {"/".join(k): v.shape for k, v in
                   flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}

  for name in names:
    bridge, theirs = tree(f"t5x/{name}", boxed=False)
    _, ours = tree(f"models/{name}", boxed=True)
    assert theirs == ours, name
    sparse = any(k.endswith("/router/w") for k in ours)
    assert isinstance(bridge, t5x_bridge.MoeEncoderDecoderModel) == sparse, name


def test_t5x_loss_and_metrics_match_moe_jax():
  """t5x.contrib.moe's MoE loss over the adapter is moe_jax's loss, with dropout and router
  jitter on: t5x's one dropout rng is split into the 'dropout' and 'router' streams exactly as
  moe_jax splits its step rng, so the same key draws the same masks and jitter. Its
  experts/* metrics are moe_jax's aux terms, and fraction_tokens_left_behind is the mean
  over MoE layers of moe_jax's fraction_dropped. Without an rng (t5x's eval) both run
  deterministically with the eval capacity factor."""
  noisy = SMALL + ["DROPOUT_RATE = 0.1", "ROUTER_JITTER_NOISE = 0.01"]
  reference = config.build_model(["models/switch_tiny.gin"], noisy)
  bridge = config.build_model(["t5x/switch_tiny.gin"], noisy)
  params = bridge.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]
  batch = batches(1)[0]
  key = jax.random.PRNGKey(3)
  loss, ours = reference.loss_fn(params, batch, key)
  theirs = {k: v.compute() for k, v in bridge.loss_fn(params, batch, key)[1].items()
            if k.startswith("experts/") or k in ("loss", "z_loss", "cross_ent_loss")}
  for t5x_name, name in (("loss", "loss"), ("cross_ent_loss", "cross_ent_loss"),
                         ("z_loss", "z_loss"), ("experts/auxiliary_loss", "aux_loss"),
                         ("experts/router_z_loss", "router_z_loss")):
    np.testing.assert_allclose(theirs[t5x_name], ours[name], rtol=1e-6, err_msg=t5x_name)
  dropped = [v for k, v in ours.items() if k.endswith("/fraction_dropped")]
  assert len(dropped) == 2 and np.mean(dropped) > 0
  np.testing.assert_allclose(theirs["experts/fraction_tokens_left_behind"], np.mean(dropped),
                             rtol=1e-6)
  assert 0 < theirs["experts/expert_usage"] <= 1 and 0 < theirs["experts/router_confidence"] < 1
  assert float(loss) != float(reference.loss_fn(params, batch, jax.random.PRNGKey(4))[0])
  np.testing.assert_allclose(bridge.eval_fn(params, batch)[0],
                             reference.eval_fn(params, batch)[0], rtol=1e-6)


def test_t5x_dense_model_matches_moe_jax():
  """The dense baseline (gin/t5x/t5_tiny.gin: t5x's plain EncoderDecoderModel, for t5x's own
  run gins) has moe_jax's params and loss."""
  small = ["EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
           "DROPOUT_RATE = 0.1"]
  reference = config.build_model(["models/t5_tiny.gin"], small)
  bridge = config.build_model(["t5x/t5_tiny.gin"], small)
  variables = bridge.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  want = flat(nn.unbox(reference.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]))
  assert {k: v.shape for k, v in flat(variables["params"]).items()} == {
      k: v.shape for k, v in want.items()}
  batch, key = batches(1)[0], jax.random.PRNGKey(3)
  np.testing.assert_allclose(bridge.loss_fn(variables["params"], batch, key)[0],
                             reference.loss_fn(variables["params"], batch, key)[0], rtol=1e-6)


def test_t5x_moe_trainer_matches_moe_jax_trainer():
  """t5x's MoeTrainer (t5x's Adafactor, contrib.moe factor rules, rsqrt schedule, MoE loss)
  and moe_jax's Trainer (its Adafactor and schedule) from the same params on the same batches:
  the same loss at every step and the same params after STEPS steps.

  Both run data-parallel on the 8 devices; the two programs differ only in how their float32
  sums are ordered, so they agree to float32 rounding: rtol 1e-5 on the losses; each param's
  STEPS updates agree to 1e-4 of its largest change. That bound is not 1e-6: Adafactor divides
  an unfactored param's gradient (the embedding's, the norms') elementwise by its own RMS, so
  an element whose gradient is a cancelling sum carries its larger relative rounding error
  into the update (measured: 3e-5 of the change in the embedding, under 1e-5 elsewhere)."""
  bridge = config.build_model(["t5x/switch_tiny.gin"], SMALL)
  reference = config.build_model(["models/switch_tiny.gin"], SMALL)
  t5x = t5x_trainer(bridge, moe_partitioner(8, 1), 1)
  start = jax.tree.map(np.asarray, flax.core.unfreeze(t5x.train_state.params))
  ours = trainer.Trainer(reference, partitioning.Partitioner(),
                         trainer.batch_shapes({"inputs": LE, "targets": LD}, B, pack=False),
                         optimizers.adafactor)
  state = ours.state_from_params(jax.device_put(start, ours.params_shardings), 0, seed=0)
  schedule = optimizers.rsqrt_schedule(LEARNING_RATE, WARMUP)
  for step, batch in enumerate(batches(STEPS)):
    theirs = t5x_step(t5x, batch)
    state, metrics = ours.train_step(state, ours.partitioner.shard_batch(batch), schedule(step))
    np.testing.assert_allclose(float(metrics["loss"]), theirs, rtol=1e-5, err_msg=f"step {step}")
  want, got = flat(jax.device_get(state.params)), flat(jax.device_get(t5x.train_state.params))
  before = flat(start)
  assert want.keys() == got.keys() == before.keys()
  for name in want:
    change = np.max(np.abs(want[name] - before[name]))
    assert change > 1e-3, f"{name} did not train"
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * change, err_msg=name)
  assert int(t5x.train_state.step) == STEPS == int(state.step)


def test_t5x_decoding_matches_moe_jax_decoding():
  """t5x's beam search over the adapter (t5x expands and gathers the decoding cache, the MoE
  layers' expert-fill counters included, per beam) decodes what moe_jax does: 1 beam =
  moe_jax's greedy (sequences and log-likelihoods); with 4 beams each beam's t5x score is the
  teacher-forced log-likelihood moe_jax scores the beam with, and the best beam is moe_jax's
  beam search's. Groups of one sequence (GROUP_SIZE = LD), so a decode step routes as scoring
  the sequence does; eval capacity factor 1 and a larger init so decode steps drop tokens."""
  small = SMALL + ["moe_layer.MoeLayer.num_groups = None", f"GROUP_SIZE = {LD}",
                   "INIT_SCALE = 3.0", "EVAL_CAPACITY_FACTOR = 1.0"]
  reference = config.build_model(["models/switch_tiny.gin"], small)
  bridge = config.build_model(["t5x/switch_tiny.gin"], small)
  params = bridge.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"]
  batch = {"encoder_input_tokens": batches(1)[0]["encoder_input_tokens"],
           "decoder_input_tokens": np.zeros((B, LD), np.int32)}
  theirs, aux = bridge.predict_batch_with_aux(params, batch, num_decodes=1)
  ours, scores = reference.predict_batch_with_scores(params, batch, decode_method="greedy")
  np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))
  np.testing.assert_allclose(np.asarray(aux["scores"]), np.asarray(scores), rtol=1e-5)
  assert len({tuple(row) for row in np.asarray(ours)}) > 1  # not one constant output

  beams, aux = bridge.predict_batch_with_aux(params, batch, num_decodes=4,
                                             return_all_decodes=True)
  beams = np.asarray(beams)  # [b, beam, l], best beam last
  for j in range(beams.shape[1]):
    targets = beams[:, j]
    scored = dict(batch, decoder_target_tokens=targets,
                  decoder_input_tokens=np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                  decoder_loss_weights=(targets > 0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(aux["scores"])[:, j],
                               np.asarray(reference.score_batch(params, scored)), rtol=1e-5)
  ours = reference.predict_batch(params, batch, decode_method="beam", beam_size=4, alpha=0.6)
  np.testing.assert_array_equal(beams[:, -1], np.asarray(ours))


def test_t5x_expert_parallel_train_step():
  """t5x's MoePjitPartitioner with 8 expert partitions on the 8 devices: the expert weights
  are sharded over 'expert', the compiled train step moves tokens by all-to-all, and its loss
  is the loss of the same step on one device. (MoeTrainer rescales the gradients of params
  whose path contains 'expert', for flaxformer's names; moe_jax's expert weights are
  mlp/wi, mlp/wo, whose gradients are already exact under jit, and are left alone.)"""
  bridge = config.build_model(["t5x/switch_tiny.gin"], SMALL + ["NUM_EXPERT_PARTITIONS = 8"])
  t5x = t5x_trainer(bridge, moe_partitioner(1, 8), 8)
  wi = t5x.train_state.params["encoder"]["layers_1"]["mlp"]["wi"]
  assert wi.sharding.spec[0] == "expert" and wi.addressable_shards[0].data.shape[0] == 1
  params = jax.tree.map(np.asarray, flax.core.unfreeze(t5x.train_state.params))
  batch = batches(1)[0]
  hlo = t5x._partitioned_train_step.lower(t5x.train_state, batch).compile().as_text()
  assert "all-to-all" in hlo
  loss = t5x_step(t5x, batch)
  on_one = jax.device_put((params, batch), jax.devices()[0])
  one_device = jax.jit(lambda p, b: bridge.loss_fn(p, b, jax.random.PRNGKey(2))[0])(*on_one)
  np.testing.assert_allclose(loss, float(one_device), rtol=1e-5)


# ---- t5x's command lines --------------------------------------------------------------------

TASK = "pydocs_span_corruption"
CLI_FLAGS = [f"--gin_search_paths={REPO / 'gin'}", "--gin_file=t5x/switch_tiny.gin",
             f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
             "--gin.NUM_MODEL_PARTITIONS=1"]


def t5x_cli(program: str, run_gin: str, *flags: str) -> str:
  """Runs `python -m t5x.<program>` with t5x.contrib.moe's `run_gin` on one CPU device (t5x's
  CPU mesh puts every device on 'model'); returns its log. Raises with the log's tail."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([*T5X_PATH, str(REPO)]),
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if "device_count" not in f))
  command = [sys.executable, "-m", f"t5x.{program}", *CLI_FLAGS,
             f"--gin_file=t5x/contrib/moe/configs/runs/{run_gin}", *flags]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
  if done.returncode:
    raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
  return done.stderr


@pytest.fixture(scope="module")
def t5x_run(tmp_path_factory):
  """t5x.train runs 3 steps of switch_tiny from the gins, then a second t5x.train resumes the
  run to step 5 (training-eval off: t5x.eval is tested on its own)."""
  model_dir = tmp_path_factory.mktemp("t5x_run")
  train = lambda steps: t5x_cli(  # noqa: E731
      "train", "pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
      "--gin.USE_CACHED_TASKS=False", "--gin.train.train_eval_dataset_cfg=None")
  first = train(3)
  return model_dir, first, train(5)


def test_t5x_cli_trains_and_resumes(t5x_run):
  """The first run saves checkpoint_3; the second restores it and continues with steps 3-5;
  the checkpoint holds moe_jax's parameter tree as it is (read with moe_jax's t5x checkpoint
  reader), trained further than step 3."""
  from moe_jax.checkpoints import t5x_checkpoints  # pylint: disable=import-outside-toplevel
  model_dir, first, second = t5x_run
  assert "Starting main loop over steps 0-3" in first
  assert "Starting main loop over steps 3-5" in second
  assert (model_dir / "checkpoint_3").is_dir() and (model_dir / "checkpoint_5").is_dir()
  at3 = t5x_checkpoints.read_t5x_checkpoint(str(model_dir / "checkpoint_3"))
  at5 = t5x_checkpoints.read_t5x_checkpoint(str(model_dir))
  assert (at3["step"], at5["step"]) == (3, 5)
  reference = config.build_model(["models/switch_tiny.gin"])
  gin.clear_config()
  shapes = {"encoder_input_tokens": (8, 32), "decoder_input_tokens": (8, 8)}
  want = jax.eval_shape(lambda: nn.unbox(
      reference.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]))
  want = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(want).items()}
  got3, got5 = flat(at3["target"]), flat(at5["target"])
  assert {k: v.shape for k, v in got5.items()} == want
  assert all(np.all(np.isfinite(v)) for v in got5.values())
  assert not np.allclose(got3["encoder/layers_1/mlp/wi"], got5["encoder/layers_1/mlp/wi"])


def test_t5x_cli_eval(t5x_run, tmp_path):
  """t5x.eval on the step-5 checkpoint: the `_eval` twin of the task (its metrics) is
  evaluated on the validation split, metrics written for step 5."""
  model_dir, _, _ = t5x_run
  t5x_cli("eval", "eval.gin", f"--gin.CHECKPOINT_PATH='{model_dir / 'checkpoint_5'}'",
          f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}_eval'",
          "--gin.utils.DatasetConfig.split='validation'")
  lines = (tmp_path / "inference_eval" / f"{TASK}_eval-metrics.jsonl").read_text().splitlines()
  metrics = json.loads(lines[-1])
  assert metrics["step"] == 5
  assert 0.0 <= metrics["sequence_accuracy"] <= 100.0
  # Targets of at most 8 tokens: between 0 and 8 × 2·ln(vocab) nats of surprise.
  assert -16 * np.log(2100) < metrics["mean_log_likelihood"] < 0


def test_t5x_cli_infer(t5x_run, tmp_path):
  """t5x.infer decodes the validation split with the step-5 checkpoint (beam search): one
  prediction per example, each a decoded string."""
  model_dir, _, _ = t5x_run
  t5x_cli("infer", "infer.gin", f"--gin.CHECKPOINT_PATH='{model_dir / 'checkpoint_5'}'",
          f"--gin.INFER_OUTPUT_DIR='{tmp_path}'", "--gin.utils.DatasetConfig.split='validation'")
  (predictions,) = tmp_path.glob(f"{TASK}-predict.jsonl-*-of-*[0-9]")
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert len(rows) > 8 and all(isinstance(r["prediction"], str) for r in rows)
