"""Faults a user makes, made for real: a read-only MODEL_DIR, every checkpoint corrupted, a
GROUP_SIZE and feature lengths a batch cannot fill, a MODEL_DIR a live process holds. Each is
one line (a refusal or a warning) and loses nothing."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from moe_jax import train

# The checkpoint-fault tests' tiny run, and their working directory (_repo_cwd: autouse).
from test_checkpoint_faults import ROOT, _flags, _repo_cwd  # noqa: F401


def _train_cmd(model_dir, *extra):
  return [sys.executable, "-m", "moe_jax.train", *_flags(model_dir, *extra)]


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if "moe_jax.train: error:" in line]


def _warnings(caplog, start):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


# ---- a read-only MODEL_DIR --------------------------------------------------------------------


def _read_only_dir(tmp_path):
  """(command prefix, MODEL_DIR, how): a tmpfs mounted read-only in a private mount namespace
  (unshare -m: the mount vanishes with the process); where that is not permitted, /sys/kernel,
  an existing directory of sysfs in which no one, root included, can create a file."""
  mount_point = tmp_path / "ro"
  mount_point.mkdir()
  probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro none "$0" && '
                          'touch "$0/x"', str(mount_point)], capture_output=True, text=True)
  if "Read-only file system" in probe.stderr:
    prefix = ["unshare", "-m", "sh", "-c",
              f'mount -t tmpfs -o ro none "{mount_point}" && exec "$@"', "sh"]
    return prefix, str(mount_point), "read-only tmpfs"
  assert not os.access("/sys/kernel/moe_jax_probe", os.F_OK)
  return [], "/sys/kernel", "sysfs"


def test_read_only_model_dir_is_one_line_before_anything_is_built(tmp_path):
  prefix, model_dir, how = _read_only_dir(tmp_path)
  proc = subprocess.run(prefix + _train_cmd(model_dir, "--gin.TRAIN_STEPS=1"), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, (how, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr
  cause = "Read-only file system" if how == "read-only tmpfs" else r"[\w ]+"
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1 and re.fullmatch(
      rf"moe_jax\.train: error: MODEL_DIR: {model_dir} is not writable: {cause}", lines[0]), (
          how, proc.stderr[-3000:])
  assert "step/s" not in proc.stderr  # no progress bar: nothing ran


# ---- every checkpoint unreadable --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A run of 4 steps with checkpoints at 2 and 4 and its metrics.jsonl."""
  model_dir = tmp_path_factory.mktemp("base")
  train.main(_flags(model_dir, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2"))
  return model_dir


def _largest_file(path):
  files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
  return max(files, key=os.path.getsize)


def _digest(path):
  """Every file under path: relative name -> sha256 of its bytes."""
  out = {}
  for d, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_all_checkpoints_unreadable_stops_and_changes_nothing(two_checkpoints, tmp_path):
  model_dir = tmp_path / "run"
  shutil.copytree(two_checkpoints, model_dir)
  os.truncate(_largest_file(model_dir / "checkpoint_4" / "params"), 1000)
  os.remove(model_dir / "checkpoint_2" / "params" / "manifest.ocdbt")
  (model_dir / "run.lock").unlink(missing_ok=True)  # the copy's, empty: compare the rest
  before = _digest(model_dir)
  with open(model_dir / "metrics.jsonl") as f:
    assert [json.loads(r)["step"] for r in f] == [1, 2, 3, 4]
  proc = subprocess.run(_train_cmd(model_dir, "--gin.TRAIN_STEPS=6"), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert re.fullmatch(
      rf"moe_jax\.train: error: MODEL_DIR {model_dir}: none of its checkpoints can be read "
      r"\(checkpoint_4, checkpoint_2; the newest: .+\); nothing was changed\. To start again "
      r"from step 0 on purpose, move them and metrics\.jsonl out of MODEL_DIR, or use another "
      r"MODEL_DIR", lines[0]), lines[0]
  (model_dir / "run.lock").unlink(missing_ok=True)
  assert _digest(model_dir) == before  # no checkpoint renamed, metrics.jsonl whole
  assert "step/s" not in proc.stderr


# ---- settings a batch cannot fill -------------------------------------------------------------


def test_group_size_and_short_feature_lengths_warn_once(tmp_path, caplog, capsys):
  """inputs 4 / targets 2, 8 rows, 8 CPU devices (8 batch partitions), GROUP_SIZE 1024.

  Groups: each partition routes its own 8 * 4 / 8 = 4 encoder and 8 * 2 / 8 = 2 decoder
  tokens, and expert capacity is at least MIN_EXPERT_CAPACITY (4).
  Span corruption at inputs 4 (T5's arithmetic): raw segments of 4 tokens, 1 of them noise in
  one span: inputs = 3 kept + 1 sentinel + EOS = 5 > 4, targets = 1 noise + 1 sentinel + EOS =
  3 > 2: every example is cut on both sides."""
  train.main(_flags(tmp_path / "run", "--gin.TRAIN_STEPS=1",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 4, 'targets': 2}"))
  assert capsys.readouterr().out.startswith("Finished at step 1 in ")
  groups = _warnings(caplog, "GROUP_SIZE")
  assert groups == [
      "GROUP_SIZE is more than a training batch gives each group (BATCH_SIZE=8, 8 batch "
      "partitions): encoder: 8 rows x inputs 4 = 32 tokens route as 8 groups of 4, not 1024 "
      "(expert capacity 4); decoder: 8 rows x targets 2 = 16 tokens route as 8 groups of 2, not "
      "1024 (expert capacity 4)"], groups
  lengths = _warnings(caplog, "TASK_FEATURE_LENGTHS")
  assert lengths == [
      "TASK_FEATURE_LENGTHS {'inputs': 4, 'targets': 2} are short for the data: "
      "pydocs_span_corruption: of its first 64 examples, 64 with inputs cut to 4 (up to 5 "
      "tokens), 64 with targets cut to 2 (up to 3 tokens)"], lengths


@pytest.mark.parametrize("task, inputs, problem", [
    # Prefix LM cuts documents into segments of inputs - 1 = 1 token; a split needs 2.
    ("pydocs_prefix_lm", 2, "makes no example at {lengths}: too short for its objective"),
    # Span corruption at inputs 1 would cut documents into segments of 0 tokens.
    ("pydocs_span_corruption", 1, "fails at {lengths}: Integer division by zero"),
])
def test_feature_lengths_that_make_no_example_are_one_line(task, inputs, problem, tmp_path,
                                                           capsys):
  lengths = {"inputs": inputs, "targets": 2}
  with pytest.raises(SystemExit) as exit_info:
    train.main(_flags(tmp_path / "run", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
                      f"--gin.TASK_FEATURE_LENGTHS={lengths}"))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
      f"moe_jax.train: error: TASK_FEATURE_LENGTHS: task '{task}' "
      f"{problem.format(lengths=lengths)}"], err
  assert not os.path.exists(tmp_path / "run")  # refused before MODEL_DIR is made


# ---- a busy MODEL_DIR -------------------------------------------------------------------------


_HOLD_LOCK = """
import sys, time
from moe_jax import model_dir
lock = model_dir.run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_busy_model_dir_is_refused_before_start_up(tmp_path):
  """A live process holds MODEL_DIR's run lock; a run on it is refused in one line naming that
  process, before its gin files are parsed (no warning of the settings checks is printed, and
  it takes about the time of its imports: printed, not asserted)."""
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(model_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    start = time.time()
    proc = subprocess.run(_train_cmd(model_dir, "--gin.TRAIN_STEPS=1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    print(f"refused {time.time() - start:.1f} s after the start")
  finally:
    holder.kill()
    holder.wait(timeout=60)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and re.fullmatch(
      rf"moe_jax\.train: error: MODEL_DIR {model_dir} is in use by another run \(pid "
      rf"{holder.pid} on {re.escape(socket.gethostname())} since [^,]+, lock {model_dir}/run\."
      r"lock\); wait for it to finish or use another MODEL_DIR", lines[0]), proc.stderr[-3000:]
  assert proc.stdout == ""
