"""The trainer for real across two JAX processes (gloo CPU collectives, 4 devices each): switch_tiny
on a 2x4 (data x expert) mesh, each process reading only its own data shard, reaches the same
losses as one process with 8 devices reading both shards; a SIGTERM to both processes leaves one
checkpoint that one process resumes from exactly."""
import json
import os
import re
import resource
import signal
import sys
import time

import numpy as np
import pytest

import multihost_worker
from moe_jax.checkpoints import orbax_utils

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
  """Train losses in metrics.jsonl; a line that a live run is still writing is left out."""
  path = model_dir / "metrics.jsonl"
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
  return [r["loss"] for r in map(json.loads, lines) if r.get("split") == "train"]


def _wait_for(processes, condition, what: str, timeout: float = 900) -> None:
  """Until condition() holds; fails if a process exits first or the timeout passes (a
  loaded machine compiles slowly: the timeout only bounds a hang)."""
  deadline = time.monotonic() + timeout
  while not condition():
    if not processes.running() or time.monotonic() > deadline:
      tails = "\n".join(f"--- process {i} rc={code}\n{err[-3000:]}"
                        for i, (code, _, err) in enumerate(processes.finish(0)))
      raise AssertionError(f"no {what}: a process exited or the time ran out\n{tails}")
    time.sleep(0.2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
  """Losses of REFERENCE_STEPS steps in one process with 8 devices."""
  model_dir = tmp_path_factory.mktemp("one_process")
  multihost_worker.launch(_command(model_dir, REFERENCE_STEPS), num_processes=1,
                          devices_per_process=8, timeout=900, cwd=ROOT)
  return _losses(model_dir)


def test_two_processes_train_like_one_and_resume_on_one_after_sigterm(one_process, tmp_path):
  two = multihost_worker.start(_command(tmp_path, 100000), num_processes=2,
                               devices_per_process=4, cwd=ROOT)
  _wait_for(two, lambda: len(_losses(tmp_path)) >= 2, "two logged steps")
  two.send_signal(signal.SIGTERM)
  stdouts = two.wait(timeout=600)
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
                          devices_per_process=8, timeout=900, cwd=ROOT)
  after = _losses(tmp_path)[preempted:]
  np.testing.assert_allclose(after, one_process[preempted:preempted + 2], rtol=1e-5)
  assert one_process[-1] < one_process[0]


def _ignore_sigxfsz():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG


def test_a_save_failing_on_process_0_stops_both_processes_in_one_line(tmp_path):
  """Process 0 may write no file over 1 MiB once the first checkpoint is there (its params file
  is ~5 MiB): its next save fails in the background. Both processes stop with the one-line
  error (process 1 cannot see the failure by itself), the last good checkpoint stays.
  Process 1's own background save waits SaveCheckpointConfig.save_timeout_s for process 0's
  write."""
  two = multihost_worker.start(
      _command(tmp_path, 100000) + ["--gin.CHECKPOINT_PERIOD=3", "--gin.KEEP_CHECKPOINTS=1",
                                    "--gin.run_config.SaveCheckpointConfig.save_timeout_s=60"],
      num_processes=2, devices_per_process=4, cwd=ROOT, preexec_fn=_ignore_sigxfsz)
  _wait_for(two, lambda: orbax_utils.latest_steps(str(tmp_path)), "the first checkpoint")
  resource.prlimit(two.procs[0].pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
  results = two.finish(timeout=600)
  failed = set()
  for index, (code, _, err) in enumerate(results):
    lines = [line for line in err.splitlines() if "moe_jax.train: error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, (index, code, err[-3000:])
    match = re.fullmatch(rf"moe_jax\.train: error: checkpoint save failed: "
                         rf"{tmp_path}/checkpoint_(\d+): (.*)", lines[0])
    assert match, lines[0]
    assert ("File too large" if index == 0 else "on process 0") in match.group(2), lines[0]
    failed.add(int(match.group(1)))
  assert len(failed) == 1
  kept = orbax_utils.latest_steps(str(tmp_path))
  assert kept and kept[-1] < failed.pop()
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p], os.listdir(tmp_path)
