"""End-to-end trainer tests on CPU with switch_tiny / t5_tiny and tiny shapes.

Runs go through the command-line code path (train.run / subprocess) with gin/runs/*.gin.
One pretraining run is shared by several tests (built once per session, also across xdist
workers). Compiled programs go to a persistent JAX compilation cache so repeated runs of the
same model skip XLA compilation.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import config
from moe_jax import data
from moe_jax import eval as eval_lib
from moe_jax import infer as infer_lib
from moe_jax import loop
from moe_jax import optimizers
from moe_jax import partitioning
from moe_jax import train
from moe_jax import trainer
from moe_jax.checkpoints import orbax_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWITCH = "--gin_file=gin/models/switch_tiny.gin"
DENSE = "--gin_file=gin/models/t5_tiny.gin"
LENGTHS = {"inputs": 32, "targets": 8}
# Tiny run settings: batch 8 (one row per simulated device), a summary every step.
SMALL = [f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.BATCH_SIZE=8", "--gin.STATS_PERIOD=1",
         "--gin.EVAL_PERIOD=0"]
PRETRAIN_STEPS = 6


def _run(argv):
  """`python -m moe_jax.train argv` in this process; returns the TrainSummary."""
  return train.run(loop.train, argv, "moe_jax.train", default_model_dir=True)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _train_rows(model_dir):
  return [r for r in _jsonl(os.path.join(model_dir, "metrics.jsonl")) if r["split"] == "train"]


def _params(step_dir):
  """Params of a checkpoint as a flat {'a/b/c': numpy array} dict (read without a target)."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
  """A directory shared by all xdist workers of this session."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  return root


def _build_once(path, build):
  """Runs build(path) unless another worker did; an exclusive file lock serializes them."""
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(path, "DONE")):
      build(path)
      with open(os.path.join(path, "DONE"), "w"):
        pass
  return path


@pytest.fixture(scope="session")
def pretrained(shared_root):
  """switch_tiny pretrained for PRETRAIN_STEPS steps, checkpoints at steps 3 and 6."""
  def build(model_dir):
    _run([SWITCH, "--gin_file=gin/runs/pretrain.gin", *SMALL, f'--gin.MODEL_DIR="{model_dir}"',
          f"--gin.TRAIN_STEPS={PRETRAIN_STEPS}", "--gin.CHECKPOINT_PERIOD=3"])
  return _build_once(str(shared_root / "switch_pretrain"), build)


# ---- pretraining, outputs, resume ----------------------------------------------------------


def test_pretrain_loss_falls_and_logs_moe_metrics(pretrained):
  rows = _train_rows(pretrained)
  assert [r["step"] for r in rows] == list(range(1, PRETRAIN_STEPS + 1))
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
  last = rows[-1]
  # T5's rsqrt schedule inside the 10k warmup: 1 / sqrt(10000).
  assert last["learning_rate"] == pytest.approx(0.01)
  for key in ("accuracy", "aux_loss", "z_loss", "cross_ent_loss", "grad_norm",
              "tokens_per_second"):
    assert np.isfinite(last[key]), key
  # Per-layer MoE metrics: switch_tiny has one MoE layer per stack (layers_1).
  for stack in ("encoder", "decoder"):
    prefix = f"moe/{stack}/layers_1/mlp"
    assert 0.0 <= last[f"{prefix}/fraction_dropped"] <= 1.0
    assert 1.0 / 8 <= last[f"{prefix}/router_confidence"] <= 1.0
    load = np.asarray(last[f"{prefix}/expert_load"])
    assert load.shape == (8,) and load.sum() == pytest.approx(1.0, abs=1e-5)
  assert last["aux_loss"] > 0
  # Each row's Unix time of writing, in order, none after the file's last change.
  times = [r["time"] for r in rows]
  assert times == sorted(times)
  assert times[-1] <= os.path.getmtime(os.path.join(pretrained, "metrics.jsonl")) + 1
  # TensorBoard event files (scalars + expert-load histograms) and finished checkpoints.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{pretrained}/train"))
  assert orbax_utils.latest_steps(pretrained) == [3, 6]
  for step in (3, 6):
    assert os.path.exists(f"{pretrained}/checkpoint_{step}/commit_success.txt")


def test_stop_and_resume_matches_uninterrupted_run(pretrained, tmp_path):
  """TRAIN_STEPS=3 then TRAIN_STEPS=6 in one MODEL_DIR == one run of 6 steps: params, optimizer
  state, step, rng and the data position all come back from the checkpoint."""
  flags = [SWITCH, "--gin_file=gin/runs/pretrain.gin", *SMALL, f'--gin.MODEL_DIR="{tmp_path}"',
           "--gin.CHECKPOINT_PERIOD=100"]
  first = _run(flags + ["--gin.TRAIN_STEPS=3"])
  second = _run(flags + ["--gin.TRAIN_STEPS=6"])
  assert first.step == 3 and second.step == 6
  assert second.restored_from == os.path.join(str(tmp_path), "checkpoint_3")
  resumed = [r["loss"] for r in _train_rows(tmp_path)]
  reference = [r["loss"] for r in _train_rows(pretrained)]
  np.testing.assert_allclose(resumed, reference, rtol=1e-6)
  got, want = _params(f"{tmp_path}/checkpoint_6"), _params(f"{pretrained}/checkpoint_6")
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "moe_jax.train", SWITCH, "--gin_file=gin/runs/pretrain.gin",
       *SMALL, f'--gin.MODEL_DIR="{tmp_path}"', "--gin.TRAIN_STEPS=100000",
       "--gin.CHECKPOINT_PERIOD=100000"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  steps = orbax_utils.latest_steps(str(tmp_path))
  assert len(steps) == 1 and steps[0] >= 2
  assert f"Preempted at step {steps[0]}" in out
  # Restorable: the train state and data position load into a trainer's abstract state.
  model = config.build_model(["gin/models/switch_tiny.gin"])
  t = trainer.Trainer(model, partitioning.Partitioner(),
                      trainer.batch_shapes(LENGTHS, 8, True), optimizers.adafactor)
  manager = orbax_utils.make_manager(str(tmp_path))
  params, train_state, data_state = orbax_utils.restore(
      manager, steps[0], abstract_params=t.abstract_params,
      abstract_train_state=t.abstract_train_state(), with_data=True)
  manager.close()
  assert int(train_state["step"]) == steps[0]
  assert data_state["batches_consumed"] == steps[0]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ---- starting from checkpoints ---------------------------------------------------------------


def test_finetune_from_an_explicit_checkpoint(pretrained, tmp_path):
  flags = [SWITCH, "--gin_file=gin/runs/finetune.gin", *SMALL, f'--gin.MODEL_DIR="{tmp_path}"',
           f'--gin.INITIAL_CHECKPOINT_PATH="{pretrained}/checkpoint_3"',
           '--gin.MIXTURE_OR_TASK_NAME="pydocs_prefix_lm"']
  # TRAIN_STEPS counts the restored steps (t5x): 3 trains nothing and stores the restored state,
  # which must be checkpoint_3's params, optimizer state, step and rng.
  start = _run(flags + ["--gin.TRAIN_STEPS=3"])
  assert start.restored_from == f"{pretrained}/checkpoint_3" and start.step == 3
  for item in ("params", "train_state"):
    got = ocp.StandardCheckpointer().restore(f"{tmp_path}/checkpoint_3/{item}")
    want = ocp.StandardCheckpointer().restore(f"{pretrained}/checkpoint_3/{item}")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A restart resumes from MODEL_DIR (not the initial checkpoint) and fine-tunes 2 steps on the
  # new task with finetune.gin's constant learning rate.
  summary = _run(flags + ["--gin.TRAIN_STEPS=5"])
  assert summary.restored_from == f"{tmp_path}/checkpoint_3" and summary.step == 5
  rows = _train_rows(tmp_path)
  assert [r["step"] for r in rows] == [4, 5]
  assert all(r["learning_rate"] == pytest.approx(1e-3) for r in rows)
  assert all(np.isfinite(r["loss"]) for r in rows)


def test_sparse_upcycle_from_a_dense_checkpoint(shared_root, tmp_path, capsys):
  def build(model_dir):
    _run([DENSE, "--gin_file=gin/runs/pretrain.gin", *SMALL, f'--gin.MODEL_DIR="{model_dir}"',
          "--gin.TRAIN_STEPS=2"])
  dense_dir = _build_once(str(shared_root / "t5_tiny_2steps"), build)
  upcycle = [SWITCH, "--gin_file=gin/runs/sparse_upcycle.gin", *SMALL,
             f'--gin.INITIAL_CHECKPOINT_PATH="{dense_dir}"', "--gin.TRAIN_STEPS=0"]
  # The dense run's optimizer state must fit this run's optimizer: one line, nothing saved.
  with pytest.raises(SystemExit) as exit_info:
    train.main([*upcycle, f'--gin.MODEL_DIR="{tmp_path}/adamw"',
                "--gin.OPTIMIZER=@optimizers.adamw"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      "moe_jax.train: error: OPTIMIZER: the dense checkpoint's optimizer state has no 0/mu/")
  assert orbax_utils.latest_steps(f"{tmp_path}/adamw") == []
  # The dense run's data position must fit this run's stream: one line, nothing saved.
  with pytest.raises(SystemExit) as exit_info:
    train.main([*upcycle, f'--gin.MODEL_DIR="{tmp_path}/seed1"', "--gin.RANDOM_SEED=1"])
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_info.value.code == 2 and line.startswith(
      "moe_jax.train: error: INITIAL_CHECKPOINT_PATH: its checkpoint's data position does not "
      "fit this run") and "RESTORE_DATASET=False" in line
  assert orbax_utils.latest_steps(f"{tmp_path}/seed1") == []
  up = _run([*upcycle, f'--gin.MODEL_DIR="{tmp_path}"'])
  assert up.step == 0 and orbax_utils.latest_steps(str(tmp_path)) == [0]
  # The upcycled run reads on after the dense run's 2 batches (its data file, read as JSON).
  def batches_read(step_dir):
    with open(f"{step_dir}/data/metadata") as f:
      return json.load(f)["batches_consumed"]
  assert batches_read(f"{dense_dir}/checkpoint_2") == 2
  assert batches_read(f"{tmp_path}/checkpoint_0") == 2
  dense = _params(f"{dense_dir}/checkpoint_2")
  moe = _params(f"{tmp_path}/checkpoint_0")
  # The optimizer state is carried over (values: tests/test_upcycle.py): Adafactor's count goes
  # on from the dense run's 2 steps while the run's own step starts at 0.
  opt_count = lambda d: int(ocp.StandardCheckpointer().restore(  # noqa: E731
      f"{d}/train_state")["opt_state"][0]["count"])
  assert opt_count(f"{dense_dir}/checkpoint_2") == opt_count(f"{tmp_path}/checkpoint_0") == 2
  for stack in ("encoder", "decoder"):
    for name in ("wi", "wo"):
      experts = moe[f"{stack}/layers_1/mlp/{name}"]
      assert experts.shape[0] == 8
      for j in range(8):
        np.testing.assert_array_equal(experts[j], dense[f"{stack}/layers_1/mlp/{name}"])
    router = moe[f"{stack}/layers_1/mlp/router/w"]
    assert router.shape == (128, 8) and np.std(router) > 0
    assert f"{stack}/layers_1/mlp/router/w" not in dense
  copied = [k for k in moe if "/router/" not in k and not k.endswith("layers_1/mlp/wi")
            and not k.endswith("layers_1/mlp/wo")]
  assert set(copied) == set(dense) - {f"{s}/layers_1/mlp/{n}" for s in ("encoder", "decoder")
                                      for n in ("wi", "wo")}
  for key in copied:
    np.testing.assert_array_equal(moe[key], dense[key], err_msg=key)
  # The upcycled model trains on from its checkpoint_0.
  cont = _run([SWITCH, "--gin_file=gin/runs/pretrain.gin", *SMALL,
               f'--gin.MODEL_DIR="{tmp_path}"', "--gin.TRAIN_STEPS=2"])
  assert cont.restored_from == f"{tmp_path}/checkpoint_0" and cont.step == 2
  assert batches_read(f"{tmp_path}/checkpoint_2") == 2 + 2
  assert np.isfinite(float(cont.final_metrics["loss"]))


def test_eval_on_the_training_stream_reads_the_batches_the_run_trained_on(tmp_path, capsys):
  """TRAIN_BATCHES_FROM=k, EVAL_STEPS=1: the loss of batch k of the run's stream. The reference
  is the run itself: at learning rate 0 its params never move and t5_tiny has no dropout, so
  its train loss at step k+1 is the checkpoint's loss on that batch."""
  _run([DENSE, "--gin_file=gin/runs/pretrain.gin", *SMALL, f'--gin.MODEL_DIR="{tmp_path}"',
        "--gin.TRAIN_STEPS=4", "--gin.LEARNING_RATE=0.0", "--gin.RANDOM_SEED=3"])
  rows = _train_rows(tmp_path)
  assert len({round(r["cross_ent_loss"], 4) for r in rows}) == 4  # 4 different batches
  flags = [DENSE, "--gin_file=gin/runs/eval.gin", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
           "--gin.BATCH_SIZE=8", f'--gin.CHECKPOINT_PATH="{tmp_path}"', "--gin.EVAL_STEPS=1",
           "--gin.RANDOM_SEED=3", f'--gin.EVAL_OUTPUT_DIR="{tmp_path}/eval"']
  key = f"{data.DEFAULT_TASK}/cross_ent_loss"
  for k in (0, 2, 3):
    results = train.run(eval_lib.evaluate, [*flags, f"--gin.TRAIN_BATCHES_FROM={k}"],
                        "moe_jax.eval")
    assert results[key] == pytest.approx(rows[k]["cross_ent_loss"], rel=1e-5), k
  # A mixture's training stream is not its tasks' streams: one line naming the setting.
  import seqio  # pylint: disable=import-outside-toplevel
  seqio.MixtureRegistry.add("two_pydocs_tasks", [data.DEFAULT_TASK, "pydocs_prefix_lm"],
                            default_rate=1.0)
  capsys.readouterr()
  try:
    with pytest.raises(SystemExit):
      eval_lib.main([*flags, "--gin.TRAIN_BATCHES_FROM=0",
                     "--gin.MIXTURE_OR_TASK_NAME='two_pydocs_tasks'"])
  finally:
    seqio.MixtureRegistry.remove("two_pydocs_tasks")
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "moe_jax.eval: error: TRAIN_BATCHES_FROM: reads one task's training stream; "
      "two_pydocs_tasks is a mixture of 2 tasks")


def test_eval_and_infer_from_a_checkpoint(pretrained, tmp_path):
  lengths = f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}"
  results = train.run(eval_lib.evaluate,
                      [SWITCH, "--gin_file=gin/runs/eval.gin", lengths, "--gin.BATCH_SIZE=8",
                       f'--gin.CHECKPOINT_PATH="{pretrained}/checkpoint_6"', "--gin.EVAL_STEPS=2",
                       f'--gin.EVAL_OUTPUT_DIR="{tmp_path}/eval"'], "moe_jax.eval")
  task = data.DEFAULT_TASK
  assert results["step"] == PRETRAIN_STEPS
  assert 0.0 <= results[f"{task}/accuracy"] <= 1.0
  # Eval on held-out text after 6 steps: the loss sits near the last training losses.
  last_train = _train_rows(pretrained)[-1]["loss"]
  assert abs(results[f"{task}/loss"] - last_train) < 1.0
  with open(tmp_path / "eval" / "eval_results.json") as f:
    assert json.load(f)[f"{task}/loss"] == pytest.approx(results[f"{task}/loss"])

  path = train.run(infer_lib.infer,
                   [SWITCH, "--gin_file=gin/runs/infer.gin", lengths, "--gin.BATCH_SIZE=8",
                    f'--gin.CHECKPOINT_PATH="{pretrained}"', "--gin.MAX_BATCHES=1",
                    f'--gin.INFER_OUTPUT_DIR="{tmp_path}/infer"'], "moe_jax.infer")
  assert path == f"{tmp_path}/infer/{task}-validation-{PRETRAIN_STEPS}.jsonl"
  rows = _jsonl(path)
  vocab = data.get_vocabulary()
  assert len(rows) == 8
  for row in rows:
    assert row["inputs"] and row["targets"]
    assert len(row["prediction_ids"]) <= LENGTHS["targets"]
    assert all(0 < t < vocab.vocab_size for t in row["prediction_ids"])
    # The text is the vocabulary's decoding of the ids.
    assert row["prediction"] == vocab.decode([t for t in row["prediction_ids"] if t != 1])


# ---- steps, optimizer, checkpoints (no training loop) ----------------------------------------


def _tiny_trainer(bindings, num_microbatches=1, partitioner=None):
  model = config.build_model(["gin/models/switch_tiny.gin"], bindings)
  return trainer.Trainer(model, partitioner or partitioning.Partitioner(),
                         trainer.batch_shapes(LENGTHS, 8, True), optimizers.adafactor,
                         num_microbatches=num_microbatches)


def _batch(t, pack=True, padded_rows=()):
  """A global batch; rows in padded_rows keep only their first half of the targets."""
  batch = next(data.get_dataset(data.DEFAULT_TASK, LENGTHS, "train", 8, seed=3, pack=pack))
  batch = {k: np.array(v) for k, v in batch.items()}  # writable copies
  for row in padded_rows:
    for key in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
      batch[key][row, LENGTHS["targets"] // 2:] = 0
  return t.partitioner.shard_batch(batch)


def _copy(state):
  return jax.tree.map(jnp.copy, state)  # train_step donates its input state


def test_microbatching_equals_one_big_batch():
  """4 microbatches of 2 rows == one batch of 8 for a deterministic model (no dropout, no
  jitter, MoE groups within a row). Padding makes the microbatches' target token counts differ,
  so this also checks the token weighting of the cross-entropy against the uniform weighting of
  the aux losses. (One MoE layer per stack keeps compilation short. One device: on a mesh the
  layers would cut a microbatch's few tokens into one group per device.)"""
  bindings = ["ROUTER_JITTER_NOISE = 0.0", "GROUP_SIZE = 8", "NUM_ENCODER_LAYERS = 1",
              "NUM_DECODER_LAYERS = 1", "ENCODER_SPARSE_STEP = 1", "DECODER_SPARSE_STEP = 1"]
  device = partitioning.Partitioner(devices=jax.devices()[:1])
  one = _tiny_trainer(bindings, partitioner=device)
  four = _tiny_trainer(bindings, num_microbatches=4, partitioner=device)
  state = one.init_state(0)
  batch = _batch(one, pack=False, padded_rows=(0, 5))  # microbatch i holds rows i, i+4
  weights = np.asarray(batch["decoder_loss_weights"]).reshape(2, 4, -1).sum(axis=(0, 2))
  assert len(set(weights.tolist())) > 1  # microbatches really differ in token counts
  s1, m1 = one.train_step(_copy(state), batch, 0.01)
  s4, m4 = four.train_step(_copy(state), batch, 0.01)
  for key in ("loss", "cross_ent_loss", "aux_loss", "accuracy", "num_tokens"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Same model, same state, another step number: a deterministic model's loss is unchanged.
  _, again = one.train_step(_copy(state).replace(step=jnp.asarray(1, jnp.int32)), batch, 0.01)
  assert float(again["loss"]) == float(m1["loss"])


def test_router_jitter_gets_a_stream_folded_from_the_step(pretrained):
  """switch_tiny has router jitter noise (and no dropout): the loss of the same params and
  batch depends on the step's rng, and only on it. (Same program as the `pretrained` run, so
  the compilation cache has it.)"""
  t = _tiny_trainer([])
  assert gin.query_parameter("%ROUTER_JITTER_NOISE") > 0
  assert gin.query_parameter("%DROPOUT_RATE") == 0 == gin.query_parameter("%EXPERT_DROPOUT_RATE")
  state = t.init_state(0)
  batch = _batch(t)
  _, a = t.train_step(_copy(state), batch, 0.01)
  _, b = t.train_step(_copy(state).replace(step=jnp.asarray(1, jnp.int32)), batch, 0.01)
  _, c = t.train_step(_copy(state), batch, 0.01)
  assert float(a["loss"]) != float(b["loss"])
  assert float(a["loss"]) == float(c["loss"])


def test_rsqrt_schedule_and_optimizers_match_references():
  schedule = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=100)
  for step in (0, 1, 50, 100, 400, 10_000):
    assert float(schedule(step)) == pytest.approx(1.0 / np.sqrt(max(step, 100)), rel=1e-6)
  assert float(optimizers.rsqrt_schedule(linear_warmup=True, warmup_steps=10)(4)) == \
      pytest.approx(0.5 / np.sqrt(10), rel=1e-6)
  # start_step: a run restarted at step 0 (upcycled) goes on with its source's schedule.
  continued = optimizers.rsqrt_schedule(warmup_steps=100, start_step=1500)
  for step in (0, 1, 500):
    assert float(continued(step)) == pytest.approx(1.0 / np.sqrt(1500 + step), rel=1e-6)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(300, 200)), jnp.float32),  # factored
            "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  # Rank <= 2 without an 'expert' axis: the classic rule, i.e. optax's Adafactor.
  axes = {"w": P("embed", "mlp"), "b": P("embed")}
  for ours, reference in ((optimizers.adafactor(axes), optax.adafactor(learning_rate=0.01)),
                          (optimizers.adamw(axes), optax.adamw(0.01, weight_decay=1e-4))):
    state, ref_state = ours.init(params), reference.init(params)
    for i in range(3):
      grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
      updates, state = ours.update(grads, state, params)
      ref_updates, ref_state = reference.update(grads, ref_state, params)
      for key in params:
        np.testing.assert_allclose(0.01 * updates[key], ref_updates[key], rtol=1e-5, atol=1e-8)


def test_checkpoint_dtype_explicit_paths_and_no_partial_checkpoints(tmp_path):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jnp.linspace(0.1, 1.0, 12, dtype=jnp.float32).reshape(3, 4)}
  manager = orbax_utils.make_manager(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    orbax_utils.save(manager, step, params=params, train_state={"step": jnp.int32(step)},
                     data_state={"batches_consumed": step}, params_dtype=jnp.bfloat16)
  manager.wait_until_finished()
  manager.close()
  assert orbax_utils.latest_steps(str(tmp_path)) == [2, 3]  # keep 2
  # An orbax temporary (an unfinished save) is not a checkpoint.
  os.makedirs(tmp_path / "checkpoint_9.orbax-checkpoint-tmp-123" / "params")
  assert orbax_utils.resolve_path(str(tmp_path)) == (str(tmp_path), 3)
  assert orbax_utils.resolve_path(f"{tmp_path}/checkpoint_2") == (str(tmp_path), 2)
  with pytest.raises(FileNotFoundError):
    orbax_utils.resolve_path(f"{tmp_path}/checkpoint_7")
  stored, _ = orbax_utils.params_metadata(str(tmp_path))
  assert stored["w"].dtype == jnp.bfloat16
  abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=sharding)}
  restored, step = orbax_utils.restore_params_from_path(str(tmp_path), abstract)
  assert step == 3 and restored["w"].dtype == jnp.float32
  expected = np.asarray(params["w"]).astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(restored["w"]), expected)


def test_infer_from_python_without_a_partitioner(pretrained, tmp_path):
  """infer.infer's declared default partitioner (None) means all devices on 'data'."""
  model = config.build_model(["gin/models/switch_tiny.gin"])
  path = infer_lib.infer(model=model, checkpoint_path=f"{pretrained}/checkpoint_6",
                         mixture_or_task_name=data.DEFAULT_TASK, task_feature_lengths=LENGTHS,
                         batch_size=8, max_batches=1, output_dir=str(tmp_path))
  rows = _jsonl(path)
  assert len(rows) == 8 and all(row["targets"] for row in rows)
