"""The trainer for real across two JAX processes (gloo CPU collectives, 4 devices each): switch_tiny
on a 2x4 (data x expert) mesh, each process reading only its own data shard, reaches the same
losses as one process with 8 devices reading both shards; a SIGTERM to both processes leaves one
checkpoint that one process resumes from exactly."""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_STEPS = 12


def _command(model_dir, train_steps: int) -> list[str]:
  return [sys.executable, "-m", "moe_jax.train", "--gin_file=gin/models/switch_tiny.gin",
          "--gin_file=gin/runs/pretrain.gin", f'--gin.MODEL_DIR="{model_dir}"',
          f"--gin.TRAIN_STEPS={train_steps}", "--gin.BATCH_SIZE=8", "--gin.STATS_PERIOD=1",
          "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=100000",
          "--gin.NUM_EXPERT_PARTITIONS=4", "--gin.NUM_DATA_SHARDS=2",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]


def _losses(model_dir) -> list[float]:
  path = model_dir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return [r["loss"] for r in rows if r.get("split") == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
  """Losses of REFERENCE_STEPS steps in one process with 8 devices."""
  model_dir = tmp_path_factory.mktemp("one_process")
  multihost_worker.launch(_command(model_dir, REFERENCE_STEPS), num_processes=1,
                          devices_per_process=8, timeout=420, cwd=ROOT)
  return _losses(model_dir)


def test_two_processes_train_like_one_and_resume_on_one_after_sigterm(one_process, tmp_path):
  two = multihost_worker.start(_command(tmp_path, 100000), num_processes=2,
                               devices_per_process=4, cwd=ROOT)
  deadline = time.monotonic() + 300
  while two.running() and len(_losses(tmp_path)) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
  assert two.running(), two.wait(0)
  two.send_signal(signal.SIGTERM)
  stdouts = two.wait(timeout=300)
  # Both processes stopped at the step they agreed on and saved it together.
  steps = sorted(int(d.split("_")[1]) for d in os.listdir(tmp_path)
                 if d.startswith("checkpoint_"))
  assert len(steps) == 1, steps
  preempted = steps[0]
  assert f"Preempted at step {preempted}" in stdouts[0]
  assert (tmp_path / f"checkpoint_{preempted}" / "commit_success.txt").exists()
  assert 2 <= preempted <= REFERENCE_STEPS - 2, preempted
  before = _losses(tmp_path)
  assert len(before) == preempted
  np.testing.assert_allclose(before, one_process[:preempted], rtol=1e-5)

  # One process with 8 devices takes over the same mesh, data shards and data position.
  multihost_worker.launch(_command(tmp_path, preempted + 2), num_processes=1,
                          devices_per_process=8, timeout=420, cwd=ROOT)
  after = _losses(tmp_path)[preempted:]
  np.testing.assert_allclose(after, one_process[preempted:preempted + 2], rtol=1e-5)
  assert one_process[-1] < one_process[0]
