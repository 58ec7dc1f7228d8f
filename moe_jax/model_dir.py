"""MODEL_DIR at start-up: one run at a time (a lock), and room to write a checkpoint.

The lock is `MODEL_DIR/run.lock`, taken by process 0 for the whole run and naming its holder
(pid, host, start time). A second run refuses in one line; a lock left by a dead run is taken
over with a warning; a MODEL_DIR that cannot be written is a one-line SettingError. The command
line looks at the lock first (`check_free`), before its start-up. `run_lock` picks one of two
kinds:

- `FileLock`, local paths: an exclusive flock, which the kernel releases when the holder dies
  in any way (kill -9 included), so "in use" and "stale" are always told apart correctly.
- `StoreLock`, any other path (gs://..., through etils.epath, the file API of the
  checkpoints). Object stores offer no exclusive create through that API, so the lock is
  written, then read back after `SETTLE_SECONDS`: of two runs that both found no lock, the
  one whose record was overwritten refuses. This excludes a second run only if each run's
  look-then-write takes less than SETTLE_SECONDS and the store reads its own writes (GCS
  does). Nothing releases the lock of a run that died; a dead holder on the same host (its
  pid is gone) is taken over, one on another host is not: the message names the file to
  delete once that run is known to be gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid

from absl import logging
from etils import epath

from moe_jax.validation import RunError, SettingError

LOCK_NAME = "run.lock"
SETTLE_SECONDS = 2.0
_PROBE_BYTES = 1 << 20


def _record(token: str = "") -> str:
  return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": token}) + "\n"


def _holder(text: str) -> str:
  try:
    info = json.loads(text or "{}")
    return f"pid {info['pid']} on {info['host']} since {info['since']}"
  except (ValueError, KeyError, TypeError):
    return "unknown holder"


def _alive_here(text: str) -> bool | None:
  """Whether the record's process exists, when it names one on this host (else None)."""
  try:
    info = json.loads(text)
    if info["host"] != socket.gethostname():
      return None
    os.kill(int(info["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (ValueError, KeyError, TypeError):
    return None
  return True


def _not_writable(model_dir: str, error: OSError) -> SettingError:
  return SettingError("MODEL_DIR", f"{model_dir} is not writable: {error.strerror or error}")


def _in_use(model_dir: str, path: str, holder: str, extra: str = "") -> RunError:
  return RunError(f"MODEL_DIR {model_dir} is in use by another run ({holder}, lock {path}); "
                  f"wait for it to finish or use another MODEL_DIR{extra}")


class FileLock:
  """An exclusive flock on a local MODEL_DIR/run.lock; `release()` (or process exit) frees it."""

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_NAME)
    try:
      self._file = open(self.path, "a+")  # pylint: disable=consider-using-with
    except OSError as e:  # a read-only mount, no permission (EROFS, EACCES, EPERM)
      raise _not_writable(model_dir, e) from None
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read()
      self._file.close()
      raise _in_use(model_dir, self.path, _holder(holder)) from None
    stale = _holder(self._read())
    if stale != "unknown holder":
      logging.warning("taking over the lock %s left by a run that is gone (%s)", self.path,
                      stale)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(_record())
    self._file.flush()

  def _read(self) -> str:
    self._file.seek(0)
    return self._file.read()

  def release(self) -> None:
    """Empties the file (a later run sees no stale holder) and unlocks it."""
    self._file.seek(0)
    self._file.truncate()
    self._file.close()


class StoreLock:
  """MODEL_DIR/run.lock through etils.epath, for stores without an exclusive create (see the
  module docstring for what it guarantees); `release()` deletes it."""

  def __init__(self, model_dir: str):
    self.path = epath.Path(model_dir) / LOCK_NAME
    self._token = uuid.uuid4().hex
    if self.path.exists():
      text = self.path.read_text()
      if not self._dead_here(text):
        raise _in_use(model_dir, str(self.path), _holder(text),
                      f"; if that run is gone, delete {self.path}")
      logging.warning("taking over the lock %s left by a run that is gone (%s)", self.path,
                      _holder(text))
    try:
      self.path.write_text(_record(self._token))
    except OSError as e:
      raise _not_writable(model_dir, e) from None
    time.sleep(SETTLE_SECONDS)
    text = self.path.read_text() if self.path.exists() else ""
    if json.loads(text or "{}").get("token") != self._token:
      self._token = ""  # not ours to delete
      raise _in_use(model_dir, str(self.path), _holder(text))

  @staticmethod
  def _dead_here(text: str) -> bool:
    """The record names a process on this host that no longer exists."""
    return _alive_here(text) is False

  def release(self) -> None:
    """Deletes the lock if it is still this run's."""
    if self._token and self.path.exists() and self._token in self.path.read_text():
      self.path.unlink(missing_ok=True)


def run_lock(model_dir: str) -> FileLock | StoreLock:
  """The lock of MODEL_DIR for this run: SettingError if MODEL_DIR cannot be written, RunError
  if another run holds it."""
  return StoreLock(model_dir) if "://" in model_dir else FileLock(model_dir)


def check_free(model_dir: str) -> None:
  """RunError at once if a live run on this host holds the lock of a local MODEL_DIR. Takes
  nothing (the run takes the lock with `run_lock`): lets the command line refuse a busy
  MODEL_DIR before its start-up, which takes seconds."""
  path = os.path.join(model_dir, LOCK_NAME)
  try:
    lock_file = open(path)  # pylint: disable=consider-using-with
  except OSError:  # no lock yet, or not readable: run_lock decides
    return
  with lock_file:
    text = lock_file.read()
    if not _alive_here(text):  # free, stale or another host's: run_lock decides
      return
    try:  # the recorded process holds it (not a reused pid): a shared lock cannot be had
      fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _in_use(model_dir, path, _holder(text)) from None


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
