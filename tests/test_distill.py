"""MoE-to-dense distillation: the loss against a NumPy formula, the student's initialisation
from a real switch_tiny checkpoint, a short CLI run of gin/runs/distill.gin and its one-line
setting errors."""
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import config
from moe_jax import data
from moe_jax import distill
from moe_jax import loop
from moe_jax import partitioning
from moe_jax import train
from moe_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = "--gin_file=gin/models/switch_tiny.gin"
LENGTHS = {"inputs": 32, "targets": 8}
SMALL = [f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.BATCH_SIZE=8", "--gin.STATS_PERIOD=1",
         "--gin.EVAL_PERIOD=0"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


def _run(argv):
  return train.run(loop.train, argv, "moe_jax.train", default_model_dir=True)


def _params(step_dir):
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _batches_read(step_dir):
  """The data position a checkpoint saved: its JSON file, read without moe_jax."""
  with open(os.path.join(step_dir, "data", "metadata")) as f:
    return json.load(f)["batches_consumed"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A real switch_tiny checkpoint (3 training steps)."""
  model_dir = str(tmp_path_factory.mktemp("teacher"))
  _run([SWITCH, "--gin_file=gin/runs/pretrain.gin", *SMALL, f'--gin.MODEL_DIR="{model_dir}"',
        "--gin.TRAIN_STEPS=3"])
  return model_dir


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_matches_numpy():
  teacher = config.build_model(["gin/models/switch_tiny.gin"])
  model = distill.DistillationModel(distill.dense_student(teacher), teacher, alpha=0.25)
  batch = next(data.get_dataset(data.DEFAULT_TASK, LENGTHS, "validation", 8, shuffle=False))
  shapes = trainer.batch_shapes(LENGTHS, 8, True)
  unbox = lambda v: flax.core.meta.unbox(v)["params"]  # noqa: E731
  student_params = unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  teacher_params = unbox(teacher.get_initial_variables(jax.random.PRNGKey(1), shapes))
  loss, metrics = jax.jit(model.loss_fn)(student_params, batch, None, teacher_params)

  # Reference: the two models' logits (their forward passes), the loss written out in NumPy.
  s = np.asarray(model.student.logits(student_params, batch), np.float64)
  t = np.asarray(teacher.logits(teacher_params, batch), np.float64)
  targets, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"].astype(np.float64)
  log_p = _np_log_softmax(s)
  p_teacher = np.exp(_np_log_softmax(t))
  hard = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  soft = -(p_teacher * log_p).sum(-1)
  lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  z = teacher.z_loss * lse ** 2
  expected = ((0.75 * hard + 0.25 * soft + z) * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["target_cross_ent_loss"]),
                             (hard * w).sum() / w.sum(), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["teacher_cross_ent_loss"]),
                             (soft * w).sum() / w.sum(), rtol=2e-5)
  assert float(metrics["aux_loss"]) == 0.0  # the student is dense

  # No gradient reaches the teacher.
  teacher_grads = jax.grad(lambda tp: model.loss_fn(student_params, batch, None, tp)[0])(
      teacher_params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(teacher_grads))


def test_student_starts_from_the_teachers_non_expert_weights(teacher_dir, tmp_path):
  # TRAIN_STEPS=0 stores the student as built: checkpoint_0.
  _run([SWITCH, "--gin_file=gin/runs/distill.gin", *SMALL, f'--gin.MODEL_DIR="{tmp_path}"',
        f'--gin.TEACHER_CHECKPOINT="{teacher_dir}"', "--gin.TRAIN_STEPS=0"])
  teacher = _params(f"{teacher_dir}/checkpoint_3")
  student = _params(f"{tmp_path}/checkpoint_0")
  experts = {f"{s}/layers_1/mlp/{n}" for s in ("encoder", "decoder") for n in ("wi", "wo")}
  routers = {f"{s}/layers_1/mlp/router/w" for s in ("encoder", "decoder")}
  assert set(teacher) - set(student) == routers
  assert set(student) == set(teacher) - routers
  for key in set(teacher) - routers - experts:  # every non-expert weight, copied exactly
    np.testing.assert_array_equal(student[key], teacher[key], err_msg=key)
  # The student is t5_tiny (the dense baseline of switch_tiny): same weights, same shapes.
  dense = config.build_model(["gin/models/t5_tiny.gin"])
  abstract = jax.eval_shape(lambda r: dense.get_initial_variables(
      r, trainer.batch_shapes(LENGTHS, 8, True)), jax.random.PRNGKey(0))
  t5_tiny = flax.traverse_util.flatten_dict(flax.core.meta.unbox(abstract)["params"], sep="/")
  assert {k: v.shape for k, v in t5_tiny.items()} == {k: v.shape for k, v in student.items()}
  for key in experts:  # the dense MLPs of the teacher's MoE layers start fresh
    assert teacher[key].shape[0] == 8 and student[key].shape == teacher[key].shape[1:]
    assert np.std(student[key]) > 0
    assert not any(np.allclose(student[key], e) for e in teacher[key])
    assert not np.allclose(student[key], teacher[key].mean(0))


def test_student_reads_on_after_the_teachers_batches(teacher_dir, tmp_path, capsys):
  """The student's stream goes on after the teacher's 3 batches (regression: from the start, a
  CPU-scale student ended on the batches its teacher trained on last, where the teacher's
  probabilities give the targets away; its train loss fell and its eval loss rose)."""
  assert _batches_read(f"{teacher_dir}/checkpoint_3") == 3
  student = [SWITCH, "--gin_file=gin/runs/distill.gin", *SMALL,
             f'--gin.TEACHER_CHECKPOINT="{teacher_dir}"']
  _run([*student, f'--gin.MODEL_DIR="{tmp_path}/on"', "--gin.TRAIN_STEPS=2"])
  assert _batches_read(f"{tmp_path}/on/checkpoint_2") == 3 + 2
  # A restart resumes from the student's own position, not the teacher's.
  _run([*student, f'--gin.MODEL_DIR="{tmp_path}/on"', "--gin.TRAIN_STEPS=3"])
  assert _batches_read(f"{tmp_path}/on/checkpoint_3") == 3 + 3
  _run([*student, f'--gin.MODEL_DIR="{tmp_path}/start"', "--gin.TRAIN_STEPS=2",
        "--gin.RESTORE_TEACHER_DATASET=False"])
  assert _batches_read(f"{tmp_path}/start/checkpoint_2") == 2
  # Another data stream than the teacher's: one line naming both settings, no checkpoint.
  capsys.readouterr()  # the progress bars above
  line = _error_line(capsys, [*student, f'--gin.MODEL_DIR="{tmp_path}/other"',
                              "--gin.RANDOM_SEED=1"])
  assert line.startswith("moe_jax.train: error: TEACHER_CHECKPOINT: its checkpoint's data "
                         "position does not fit this run")
  assert "'seed': (0, 1)" in line and "RESTORE_TEACHER_DATASET=False" in line
  assert not [d for d in os.listdir(tmp_path / "other") if d.startswith("checkpoint")]


def test_distill_cli_trains_the_student(teacher_dir, tmp_path):
  """`python -m moe_jax.train ... distill.gin` for 3 steps on a mesh with an 'expert' axis of 2
  (the teacher's experts split over it): the train metrics carry both parts of the loss, mixed
  with DISTILLATION_ALPHA."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "moe_jax.train", SWITCH, "--gin_file=gin/runs/distill.gin",
         *SMALL, f'--gin.MODEL_DIR="{tmp_path}"', f'--gin.TEACHER_CHECKPOINT="{teacher_dir}"',
         "--gin.TRAIN_STEPS=3", "--gin.DISTILLATION_ALPHA=0.5", "--gin.NUM_EXPERT_PARTITIONS=2"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Finished at step 3" in out.stdout
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    mixed = 0.5 * r["target_cross_ent_loss"] + 0.5 * r["teacher_cross_ent_loss"]
    assert r["cross_ent_loss"] == pytest.approx(mixed, rel=1e-5)
    assert r["loss"] == pytest.approx(mixed + r["z_loss"], rel=1e-5)
    assert not any(k.startswith("moe/") for k in r)  # the student is dense


def test_teacher_params_are_sharded_like_the_student(teacher_dir):
  teacher = config.build_model(["gin/models/switch_tiny.gin"], ["NUM_EXPERT_PARTITIONS=2"])
  part = partitioning.Partitioner(num_expert_partitions=2)
  model, params = distill.Distillation(teacher_dir, 0.25).setup(
      teacher, part, trainer.batch_shapes(LENGTHS, 8, True))
  assert dict(part.mesh.shape) == {"data": 4, "expert": 2, "model": 1}
  for stack in ("encoder", "decoder"):
    mlp = params[stack]["layers_1"]["mlp"]
    assert mlp["wi"].shape == (8, 128, 256) and mlp["wi"].sharding.spec[0] == "expert"
    assert mlp["wi"].sharding.mesh == part.mesh
  # The student's shared weights get the same shardings as the teacher's.
  student = trainer.Trainer(model, part, trainer.batch_shapes(LENGTHS, 8, True))
  emb = params["token_embedder"]["embedding"]
  assert student.params_shardings["token_embedder"]["embedding"] == emb.sharding


def _error_line(capsys, argv):
  with pytest.raises(SystemExit) as e:
    _run(argv)
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def test_bad_distillation_settings_are_one_line(teacher_dir, tmp_path, capsys):
  base = [SWITCH, "--gin_file=gin/runs/distill.gin", *SMALL, f'--gin.MODEL_DIR="{tmp_path}"']
  line = _error_line(capsys, base)
  assert "TEACHER_CHECKPOINT is required" in line
  line = _error_line(capsys, base + [f'--gin.TEACHER_CHECKPOINT="{tmp_path}/nowhere"'])
  assert line.startswith("moe_jax.train: error: TEACHER_CHECKPOINT: no readable checkpoint")
  teacher = [f'--gin.TEACHER_CHECKPOINT="{teacher_dir}"']
  for alpha in ("1.5", "-0.1"):
    line = _error_line(capsys, base + teacher + [f"--gin.DISTILLATION_ALPHA={alpha}"])
    assert line.startswith("moe_jax.train: error: DISTILLATION_ALPHA: must be")
  line = _error_line(capsys, base + teacher + ["--gin.VOCAB_SIZE=2304"])
  assert ("TEACHER_CHECKPOINT: the teacher's vocabulary has 2100 ids, the student's "
          "(VOCAB_SIZE) 2304") in line
  assert not os.listdir(tmp_path)  # nothing was written


def test_reproduce_distillation_quick(tmp_path):
  """scripts/reproduce.py distillation --quick: dense, teacher, student and the student's
  control (alpha 0) runs through the CLI, the student trained from the teacher's run and on the
  batches after the teacher's, the teacher evaluated on its last batches and the next ones,
  the JSON report and the plot."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import reproduce  # pylint: disable=import-outside-toplevel
  report = reproduce.reproduce("distillation", quick=True, runs_dir=str(tmp_path / "runs"),
                                out=str(tmp_path / "out"), log=lambda _: None)
  with open(tmp_path / "out" / "distillation.json") as f:
    saved = json.load(f)
  assert saved["figures"] == json.loads(json.dumps(report["figures"]))
  assert os.path.getsize(tmp_path / "out" / "distillation.png") > 10_000
  dense, teacher, student, control, own_last, own_next = saved["commands"]
  assert "t5_tiny.gin" in dense and "runs/pretrain.gin" in teacher
  teacher_dir = teacher.split("MODEL_DIR=")[1].strip("'\"")
  assert "runs/distill.gin" in student and f"TEACHER_CHECKPOINT='{teacher_dir}'" in student
  # The control is the student's command with the teacher's weight set to 0.
  assert "--gin.DISTILLATION_ALPHA=0.0" in control
  assert control.split("MODEL_DIR=")[0].replace(" --gin.DISTILLATION_ALPHA=0.0", "") == \
      student.split("MODEL_DIR=")[0]
  for cmd, start in ((own_last, 40), (own_next, 60)):  # 60 quick steps, 20 batches each
    assert cmd.startswith("python -m moe_jax.eval --gin_file=gin/models/switch_tiny.gin")
    assert f"CHECKPOINT_PATH='{teacher_dir}'" in cmd and "EVAL_STEPS=20" in cmd
    assert f"--gin.TRAIN_BATCHES_FROM={start} " in cmd and "RANDOM_SEED=0" in cmd
  assert np.isfinite(saved["figures"]["teacher_xent_own_last_batches"])
  assert np.isfinite(saved["figures"]["teacher_xent_next_batches"])
  final = saved["figures"]["final_eval_xent"]
  assert all(np.isfinite(v) for v in final.values()) and len(final) == 4
  assert saved["figures"]["teacher_gain"] == pytest.approx(
      final["dense T5"] - final["Switch"])
  student_dir = student.split("MODEL_DIR=")[1].strip("'\"")
  with open(os.path.join(ROOT, student_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all("teacher_cross_ent_loss" in r for r in rows if r["split"] == "train")
  assert _batches_read(os.path.join(ROOT, student_dir, "checkpoint_60")) == 60 + 60
