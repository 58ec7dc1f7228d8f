"""Faults against real runs: corrupted checkpoint files, kill -9, two processes on one MODEL_DIR,
a full disk (RLIMIT_FSIZE on the real process), a real divergence (huge learning rate)."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import flax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import loop
from moe_jax import train
from moe_jax.checkpoints import orbax_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
         "--gin.STATS_PERIOD=1", "--gin.EVAL_PERIOD=0"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


def _flags(model_dir, *extra):
  return FLAGS + [f'--gin.MODEL_DIR="{model_dir}"', *extra]


def _steps(model_dir):
  """Train steps in metrics.jsonl; a line being written by a live run is left out."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.endswith("\n")]
  return [row["step"] for row in map(json.loads, lines) if row["split"] == "train"]


def _finite_params(step_dir):
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))
  return all(np.isfinite(np.asarray(x)).all() for x in flax.traverse_util.flatten_dict(
      tree).values())


def _start(model_dir, *extra, preexec_fn=None):
  return subprocess.Popen([sys.executable, "-m", "moe_jax.train", *_flags(model_dir, *extra)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec_fn)


def _wait_for(proc, condition, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"exited before {what}: {proc.communicate()[1][-3000:]}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _error_lines(stderr, prog="moe_jax.train"):
  return [line for line in stderr.splitlines() if f"{prog}: error:" in line]


# ---- corrupted checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A run of 4 steps with checkpoints at 2 and 4."""
  model_dir = tmp_path_factory.mktemp("base")
  train.run(loop.train, _flags(model_dir, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2"),
            "moe_jax.train")
  return model_dir


def _largest_file(path):
  files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
  return max(files, key=os.path.getsize)


CORRUPTIONS = {
    "truncated array file": lambda ckpt: os.truncate(_largest_file(f"{ckpt}/params"), 1000),
    "deleted manifest": lambda ckpt: os.remove(f"{ckpt}/params/manifest.ocdbt"),
    "deleted data state": lambda ckpt: shutil.rmtree(f"{ckpt}/data"),
    "deleted train_state": lambda ckpt: shutil.rmtree(f"{ckpt}/train_state"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_restart_falls_back_to_the_newest_readable_checkpoint(corruption, two_checkpoints,
                                                              tmp_path, capsys, caplog):
  model_dir = tmp_path / "run"
  shutil.copytree(two_checkpoints, model_dir)
  CORRUPTIONS[corruption](f"{model_dir}/checkpoint_4")
  summary = train.run(loop.train, _flags(model_dir, "--gin.TRAIN_STEPS=5"), "moe_jax.train")
  assert summary.restored_from == f"{model_dir}/checkpoint_2" and summary.step == 5
  assert f"Resumed from {model_dir}/checkpoint_2 (step 2)" in capsys.readouterr().out
  warnings = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
  assert len(warnings) == 1 and f"{model_dir}/checkpoint_4:" in warnings[0]
  assert "\n" not in warnings[0]
  # The broken one is kept aside, never read again; training went on from step 2.
  assert os.path.isdir(f"{model_dir}/checkpoint_4.corrupt")
  assert orbax_utils.latest_steps(str(model_dir)) == [2, 5]
  assert _steps(model_dir) == [1, 2, 3, 4, 5]  # steps 3, 4 of the first run were dropped


# ---- kill -9, the run lock, resume ------------------------------------------------------------


def test_second_run_refused_then_kill_9_resumes_with_stale_lock_taken_over(tmp_path):
  model_dir = tmp_path / "run"
  first = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=3",
                 "--gin.KEEP_CHECKPOINTS=2")
  try:
    _wait_for(first, lambda: orbax_utils.latest_steps(str(model_dir))
              and len(_steps(model_dir)) > orbax_utils.latest_steps(str(model_dir))[-1],
              "a checkpoint and steps after it")
    second = _start(model_dir, "--gin.TRAIN_STEPS=100000")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(rf"MODEL_DIR {model_dir} is in use by another run \(pid {first.pid} on ",
                     lines[0]), lines[0]
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  restored = orbax_utils.latest_steps(str(model_dir))[-1]
  assert len(_steps(model_dir)) > restored
  third = _start(model_dir, f"--gin.TRAIN_STEPS={restored + 2}")
  out, err = third.communicate(timeout=300)
  assert third.returncode == 0, err[-3000:]
  assert out.splitlines()[0] == f"Resumed from {model_dir}/checkpoint_{restored} (step {restored})"
  assert "taking over the lock" in err and f"pid {first.pid}" in err
  # No step twice: the rows the killed run logged after its checkpoint were dropped.
  assert _steps(model_dir) == list(range(1, restored + 3))


# A process that takes MODEL_DIR's StoreLock (argv[1]), says so, and holds it.
_HOLD_STORE_LOCK = """
import sys, time
from moe_jax import model_dir, validation
model_dir.SETTLE_SECONDS = 5.0  # the guarantee's margin, generous on a loaded test machine
try:
  lock = model_dir.StoreLock(sys.argv[1])
except validation.RunError as e:
  print("refused:", e, flush=True)
  sys.exit(1)
print("locked", flush=True)
time.sleep(600)
"""


def _hold_store_lock(model_dir):
  return subprocess.Popen([sys.executable, "-c", _HOLD_STORE_LOCK, str(model_dir)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_store_lock_through_epath_excludes_a_second_run_and_takes_over_a_dead_one(tmp_path):
  """The lock for stores without an exclusive create (gs://), on a local path through the same
  etils.epath calls: of two runs starting together exactly one gets it; a later one is
  refused naming the holder; the lock of a killed holder on this host is taken over."""
  racers = [_hold_store_lock(tmp_path) for _ in range(2)]
  try:
    firsts = [p.stdout.readline() for p in racers]
    assert sorted(line.split(":")[0].strip() for line in firsts) == ["locked", "refused"], firsts
    holder = racers[[line.strip() for line in firsts].index("locked")]
    late = _hold_store_lock(tmp_path)
    out, _ = late.communicate(timeout=120)
    assert late.returncode == 1
    assert re.search(rf"MODEL_DIR {tmp_path} is in use by another run \(pid {holder.pid} on .*; "
                     rf"if that run is gone, delete {tmp_path}/run.lock", out), out
    holder.kill()
    holder.wait(timeout=60)
  finally:
    for p in racers:
      if p.poll() is None:
        p.kill()
  taker = _hold_store_lock(tmp_path)
  try:
    assert taker.stdout.readline() == "locked\n"
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == taker.pid
  finally:
    taker.kill()
    _, err = taker.communicate(timeout=60)
  assert f"taking over the lock {tmp_path}/run.lock left by a run that is gone (pid " \
         f"{holder.pid} on " in err


def test_store_lock_release_deletes_only_its_own_lock(tmp_path):
  from moe_jax import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel
  lock = model_dir_lib.StoreLock(str(tmp_path))
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "run.lock").exists()


# ---- full disk --------------------------------------------------------------------------------


def _file_size_limit(limit):
  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    if limit is not None:
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


def test_full_disk_at_start_up_is_one_line(tmp_path):
  proc = _start(tmp_path / "run", "--gin.TRAIN_STEPS=2", preexec_fn=_file_size_limit(256 << 10))
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  lines = _error_lines(err)
  assert lines == [f"moe_jax.train: error: MODEL_DIR: {tmp_path}/run is not writable: "
                   "File too large"], err[-3000:]
  assert "Traceback" not in err


def test_disk_full_during_a_save_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
  """A checkpoint is saved, then the real process may write no file over 1 MiB (a params file
  is ~5 MiB): the next save fails in the background; the run stops at once with one line,
  leaves no temporary directory, and rotation (KEEP_CHECKPOINTS=1) kept the last good one."""
  model_dir = tmp_path / "run"
  proc = _start(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=20",
                "--gin.KEEP_CHECKPOINTS=1", preexec_fn=_file_size_limit(None))
  try:
    _wait_for(proc, lambda: orbax_utils.latest_steps(str(model_dir)), "the first checkpoint")
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, err[-3000:]
  lines = _error_lines(err)
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  match = re.fullmatch(rf"moe_jax\.train: error: checkpoint save failed: "
                       rf"{model_dir}/checkpoint_(\d+): .*File too large.*", lines[0])
  assert match, lines[0]
  failed = int(match.group(1))
  kept = orbax_utils.latest_steps(str(model_dir))
  assert kept and kept[-1] < failed and _finite_params(f"{model_dir}/checkpoint_{kept[-1]}")
  assert not [p for p in os.listdir(model_dir) if "tmp" in p], os.listdir(model_dir)
  # The run stopped soon after the failed save finished, not at the next save.
  assert max(_steps(model_dir)) < failed + 20


# ---- divergence -------------------------------------------------------------------------------


def _main_exit(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  return exit_info.value.code, capsys.readouterr().err


DIVERGE = ["--gin.LEARNING_RATE=1e30", "--gin.OPTIMIZER=@optimizers.adamw"]


def _diverge(model_dir, capsys, *flags: str) -> tuple[str, str]:
  """Trains 2 finite steps, then resumes with a diverging learning rate and `flags`: (the one
  error line, all of stderr) of that run, which must exit 1 without a traceback."""
  train.run(loop.train, _flags(model_dir, "--gin.TRAIN_STEPS=2",
                                  "--gin.OPTIMIZER=@optimizers.adamw"), "moe_jax.train")
  code, err = _main_exit(_flags(model_dir, *flags, *DIVERGE), capsys)
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and "Traceback" not in err
  return lines[0], err


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  model_dir = tmp_path / "run"
  line, _ = _diverge(model_dir, capsys, "--gin.TRAIN_STEPS=50", "--gin.CHECKPOINT_PERIOD=1",
                     "--gin.KEEP_CHECKPOINTS=1")
  match = re.search(r"non-finite loss, gradient or update at step (\d+) \(loss \S+, grad_norm "
                    r"nan; 1 in a row, MAX_NONFINITE_SKIPS=0\); MoE layers at that step: "
                    r"decoder/layers_1/mlp: fraction_dropped [^;]*router_confidence [^;]*"
                    r"router_z_loss [^;]*; encoder/layers_1/mlp: .*last good checkpoint: "
                    rf"{model_dir}/checkpoint_(\d+)$", line)
  assert match, line
  bad, last_good = int(match.group(1)), int(match.group(2))
  # Nothing of the bad step (or later) was saved; the newest checkpoint is the last finite step.
  assert orbax_utils.latest_steps(str(model_dir)) == [last_good] == [bad - 1]
  assert _finite_params(f"{model_dir}/checkpoint_{last_good}")


def test_divergence_stops_at_once_with_long_stats_and_checkpoint_periods(tmp_path, capsys):
  """STATS_PERIOD and CHECKPOINT_PERIOD 500: the run still stops one step after the first
  non-finite step (the progress bar's last count), not at step 500."""
  model_dir = tmp_path / "run"
  line, err = _diverge(model_dir, capsys, "--gin.TRAIN_STEPS=500", "--gin.STATS_PERIOD=500",
                       "--gin.CHECKPOINT_PERIOD=500")
  match = re.search(r"non-finite loss, gradient or update at step (\d+) .*MoE layers at that "
                    r"step: decoder/layers_1/mlp: fraction_dropped .*last good checkpoint: "
                    rf"{model_dir}/checkpoint_2$", line)
  assert match, line
  bad = int(match.group(1))
  steps_run = int(re.findall(r"(\d+)/500", err)[-1])
  assert 2 < bad <= steps_run <= bad + 1, (bad, steps_run)
  assert orbax_utils.latest_steps(str(model_dir)) == [2]
  assert _finite_params(f"{model_dir}/checkpoint_2")


def test_skipping_nonfinite_updates_counts_them_and_stops_after_n_in_a_row(tmp_path, capsys):
  model_dir = tmp_path / "run"
  code, err = _main_exit(_flags(model_dir, "--gin.TRAIN_STEPS=50", "--gin.MAX_NONFINITE_SKIPS=2",
                                *DIVERGE), capsys)
  assert code == 1
  match = re.search(r"step (\d+) .*; 3 in a row, MAX_NONFINITE_SKIPS=2\)", _error_lines(err)[0])
  assert match, err[-2000:]
  bad = int(match.group(1))
  with open(model_dir / "metrics.jsonl") as f:
    rows = {r["step"]: r for r in map(json.loads, f)}
  # The two skipped steps before it are logged and counted; nothing after the stop is.
  assert [rows[s]["nonfinite_skipped"] for s in (bad - 2, bad - 1)] == [1.0, 1.0]
  assert rows[bad - 3]["nonfinite_skipped"] == 0.0 and max(rows) == bad - 1
  assert orbax_utils.latest_steps(str(model_dir)) == []  # CHECKPOINT_PERIOD 100: none yet
