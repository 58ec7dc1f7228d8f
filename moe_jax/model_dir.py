"""MODEL_DIR at start-up: one run at a time (a lock), and room to write a checkpoint.

The lock is `MODEL_DIR/run.lock`, held by process 0 with an exclusive flock for the whole run
and naming its holder (pid, host, start time). A second run refuses in one line; a lock file
left by a dead run (kill -9, a crashed host) is taken over with a warning. Remote model dirs
(gs://...) have no lock: their file systems offer no exclusive create that all writers honour.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

from absl import logging

from moe_jax.validation import RunError, SettingError

LOCK_NAME = "run.lock"
_PROBE_BYTES = 1 << 20


class RunLock:
  """An exclusive lock on a local MODEL_DIR; `release()` (or process exit) frees it."""

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_NAME)
    self._file = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder()
      self._file.close()
      raise RunError(f"MODEL_DIR {model_dir} is in use by another run ({holder}, lock "
                     f"{self.path}); wait for it to finish or use another MODEL_DIR") from None
    stale = self._holder()
    if stale != "unknown holder":
      logging.warning("taking over the lock %s left by a run that is gone (%s)", self.path,
                      stale)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    self._file.flush()

  def _holder(self) -> str:
    self._file.seek(0)
    try:
      info = json.loads(self._file.read() or "{}")
      return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError):
      return "unknown holder"

  def release(self) -> None:
    """Empties the file (a later run sees no stale holder) and unlocks it."""
    self._file.seek(0)
    self._file.truncate()
    self._file.close()


def check_writable(model_dir: str, checkpoint_bytes: int) -> None:
  """MODEL_DIR can be written and has room for one more checkpoint (local dirs)."""
  probe = os.path.join(model_dir, f".write_probe.{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"\0" * min(_PROBE_BYTES, max(checkpoint_bytes, 1)))
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise SettingError("MODEL_DIR", f"{model_dir} is not writable: {e.strerror or e}") from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)
  free = shutil.disk_usage(model_dir).free
  if free < checkpoint_bytes:
    raise SettingError("MODEL_DIR", f"{model_dir} has {free / 2**20:.1f} MiB free, one "
                                    f"checkpoint needs about {checkpoint_bytes / 2**20:.1f} MiB")
