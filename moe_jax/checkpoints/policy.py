"""When a training run saves, restores and deletes checkpoints, so that none is lost or poisoned.

- Restore takes the newest checkpoint of MODEL_DIR that is complete and readable; each newer
  one that is not is renamed `checkpoint_<step>.corrupt` (kept for inspection, never read
  again) with a one-line warning. If none is readable the run stops in one line and changes
  nothing: it never starts again from step 0 on its own.
- Saves are asynchronous (orbax); `poll()` after every step notices a finished save at once:
  a failure (disk full, permissions) stops the run with one line naming the directory and the
  cause, and its temporary directory is removed. Several processes stop together, at the next
  stats period or save (see CheckpointPolicy.check).
- Rotation (KEEP_CHECKPOINTS) happens here, only after the newest save is confirmed complete,
  so it never deletes the newest good checkpoint (orbax's own max_to_keep also deletes after a
  failed save). The trainer saves only finite states (see trainer.Trainer's non-finite guard).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging as absl_logging
from etils import epath

from moe_jax.checkpoints import orbax_utils
from moe_jax.validation import RunError, SettingError

CORRUPT_SUFFIX = ".corrupt"


class _OrbaxErrors(logging.Filter):
  """Keeps orbax's logged exceptions (tracebacks of a failed background save or restore) off
  stderr and remembers the first one since `reset()`, which is reported in one line (later
  ones are consequences). quiet: also orbax's warnings (while probing checkpoints that may be
  broken)."""

  def __init__(self, quiet: bool = False):
    super().__init__()
    self.quiet = quiet
    self.first: BaseException | None = None

  def reset(self) -> None:
    self.first = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and _through_orbax(record.exc_info[2]):
      self.first = self.first or record.exc_info[1]
      return False
    return not (self.quiet and "orbax" in record.pathname and record.levelno < logging.ERROR)

  def install(self) -> None:
    # asyncio logs the unretrieved exceptions of orbax's writer tasks ("Task exception was
    # never retrieved") on its own logger.
    for name in ("absl", "asyncio"):
      logging.getLogger(name).addFilter(self)

  def remove(self) -> None:
    for name in ("absl", "asyncio"):
      logging.getLogger(name).removeFilter(self)


def _ignore_closed_loop_callbacks() -> None:
  """After a failed read or write, orbax's threads may still call back into an event loop it
  closed; Python prints each as an 'Exception ignored' traceback. They are consequences of the
  error reported in one line, so this process-wide hook drops them (and only them)."""
  previous = sys.unraisablehook
  if getattr(previous, "moe_jax_closed_loop", False):
    return

  def hook(unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.moe_jax_closed_loop = True
  sys.unraisablehook = hook


class _UnretrievedOrbaxErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's tasks: after a failed
  read, its other reads' tasks report the same error whenever they are garbage-collected, which
  may be long after the error was reported (or the run stopped) in one line. A task that awaited
  a tensorstore read directly has no orbax frame in its traceback: its error names tensorstore."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith("Task exception was never retrieved")
                and record.exc_info and (_through_orbax(record.exc_info[2])
                                         or "tensorstore" in str(record.exc_info[1])))


def _drop_unretrieved_orbax_errors() -> None:
  """Installs _UnretrievedOrbaxErrors on asyncio's logger, once per process."""
  log = logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedOrbaxErrors) for f in log.filters):
    log.addFilter(_UnretrievedOrbaxErrors())


def _join_orbax_threads(timeout: float = 60.0) -> None:
  """Waits (up to `timeout` seconds in all) for orbax's background threads, e.g. a failed
  save's other writers, to end."""
  deadline = time.time() + timeout
  for thread in threading.enumerate():
    target = getattr(thread, "_target", None)  # plain threads running an orbax function
    if thread is not threading.current_thread() and "orbax" in (
        type(thread).__module__ + getattr(target, "__module__", "")):
      thread.join(max(deadline - time.time(), 0.0))


def _through_orbax(tb: Any) -> bool:
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[_OrbaxErrors]:
  errors = _OrbaxErrors(quiet=True)
  errors.install()
  _ignore_closed_loop_callbacks()
  _drop_unretrieved_orbax_errors()
  try:
    yield errors
  finally:
    errors.remove()


def _cause(error: BaseException | None) -> str:
  if error is None:
    return "the background save did not complete"
  text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
  text = f"{type(error).__name__}: {text}"
  # Storage errors name every path on the way first and the reason (e.g. "File too large")
  # last: keep both ends.
  return text if len(text) <= 300 else f"{text[:140]} ... {text[-140:]}"


def is_complete(model_dir: str, step: int) -> bool:
  """All items of a checkpoint are there and orbax finalized it (renamed from its temporary)."""
  path = epath.Path(orbax_utils.step_dir(model_dir, step))
  return path.is_dir() and all((path / item).is_dir() for item in orbax_utils.ITEMS)


def remove_temporaries(model_dir: str) -> None:
  """orbax's unfinished step directories (`checkpoint_<step>.orbax-checkpoint-tmp-*`)."""
  for path in epath.Path(model_dir).glob(f"{orbax_utils.STEP_PREFIX}_*.orbax-checkpoint-tmp*"):
    path.rmtree(missing_ok=True)


def restore_newest(model_dir: str, restore_step: Any) -> tuple[Any, int] | None:
  """(restore_step(reader, step), step) for the newest step that restores; None when MODEL_DIR
  has no checkpoint.

  Newer steps that are incomplete or fail to restore are then renamed
  `checkpoint_<step>.corrupt` by process 0 with a one-line warning each. When none of the
  checkpoints restores, RunError naming them and nothing is renamed: starting again from step 0
  would lose the run (and rewrite its metrics.jsonl). A SettingError of restore_step (the
  checkpoint is readable but belongs to another model) is raised as it is: nothing is renamed.
  """
  found, unreadable = None, []
  with _orbax_quiet():
    for step in reversed(orbax_utils.latest_steps(model_dir)):
      try:
        if not is_complete(model_dir, step):
          raise FileNotFoundError(f"missing item(s) of {orbax_utils.ITEMS}")
        reader = orbax_utils.read_only_manager(model_dir)
        try:
          found = restore_step(reader, step), step
        finally:
          reader.close()
        break
      except SettingError:
        raise
      except Exception as e:  # noqa: BLE001  any unreadable checkpoint is skipped
        unreadable.append((orbax_utils.step_dir(model_dir, step), _cause(e)))
  if found is not None:
    for path, cause in unreadable:
      absl_logging.warning("skipping checkpoint %s: unreadable (%s); renamed to %s%s", path,
                           cause, path, CORRUPT_SUFFIX)
      if jax.process_index() == 0:
        epath.Path(path).rename(path + CORRUPT_SUFFIX)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("moe_jax restore_newest")
  if found is None and unreadable:
    names = ", ".join(epath.Path(path).name for path, _ in unreadable)
    raise RunError(f"MODEL_DIR {model_dir}: none of its checkpoints can be read ({names}; "
                   f"the newest: {unreadable[0][1]}); nothing was changed. To start again from "
                   "step 0 on purpose, move them and metrics.jsonl out of MODEL_DIR, or use "
                   "another MODEL_DIR")
  return found


class CheckpointPolicy:
  """Saves of one run into MODEL_DIR: asynchronous, checked as soon as they finish, rotated.

  keep: how many complete checkpoints to keep (None: all).
  model_description: saved with every checkpoint (see model_description.describe).
  save_timeout_s: see orbax_utils.make_manager.

  Process 0 confirms each save. With one process a failed save raises RunError at the next
  `poll` (the step after it finished). With several, every process must stop together (a
  process that stops alone leaves its peers waiting in the next collective), so the failure
  is shared by `check`, a one-integer all-gather that the loop calls where all processes are
  anyway (each stats period, before each save, at the end). The other processes' background
  saves wait for process 0's write at an orbax barrier, up to save_timeout_s, before they
  reach it.
  """

  def __init__(self, model_dir: str, keep: int | None, params_dtype: Any = None,
               model_description: dict[str, Any] | None = None, save_timeout_s: int = 1200):
    self.model_dir, self.keep, self.params_dtype = model_dir, keep, params_dtype
    self.model_description = model_description
    self.manager = orbax_utils.make_manager(model_dir, max_to_keep=None,
                                            save_timeout_s=save_timeout_s)
    self._errors = _OrbaxErrors()
    self._errors.install()
    _ignore_closed_loop_callbacks()
    self._pending: int | None = None
    self._failed: tuple[int, RunError] | None = None  # (step, error) of a failed save

  def save(self, step: int, *, params: Any, train_state: Any, data_state: Any) -> str:
    """Starts writing checkpoint_<step> (after the previous save is confirmed)."""
    self.wait()
    self.check()
    self._errors.reset()
    orbax_utils.save(self.manager, step, params=params, train_state=train_state,
                     data_state=data_state, params_dtype=self.params_dtype,
                     model_description=self.model_description)
    self._pending = step
    return orbax_utils.step_dir(self.model_dir, step)

  def poll(self) -> None:
    """Non-blocking: confirms the last save if it finished (rotating, or, with one process,
    raising RunError if it failed)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._confirm()
      if jax.process_count() == 1:
        self.check()

  def wait(self) -> None:
    """Blocks until the last save finished and confirms it (see `check` for its failure)."""
    if self._pending is not None:
      with contextlib.suppress(Exception):  # its error is what _confirm reports
        self.manager.wait_until_finished()
      self._confirm()

  def check(self) -> None:
    """Raises RunError, on every process, if a save failed. Several processes: a collective,
    so every process must call it at the same point."""
    step = self._failed[0] if self._failed else -1
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      step = int(np.max(multihost_utils.process_allgather(np.int32(step))))
    if step >= 0:
      raise self._failed[1] if self._failed else RunError(
          f"checkpoint save failed: {orbax_utils.step_dir(self.model_dir, step)}: on process 0 "
          "(its log names the cause)")

  def _confirm(self) -> None:
    step, self._pending = self._pending, None
    if jax.process_index() != 0:
      return
    if not is_complete(self.model_dir, step):
      self._close_manager()
      _join_orbax_threads()  # its remaining writers would re-create what the clean-up removes
      remove_temporaries(self.model_dir)
      # Stragglers of those threads may still log: the filter stays installed.
      self._failed = step, RunError(f"checkpoint save failed: "
                                    f"{orbax_utils.step_dir(self.model_dir, step)}: "
                                    f"{_cause(self._errors.first)}")
      return
    if self.keep is not None:
      for old in orbax_utils.latest_steps(self.model_dir)[:-self.keep]:
        epath.Path(orbax_utils.step_dir(self.model_dir, old)).rmtree(missing_ok=True)

  def close(self) -> None:
    """Waits for the last save (raising RunError, see `check`, if one failed) and releases
    the manager."""
    try:
      self.wait()
      self.check()
    finally:
      self._close_manager()
      if self._failed:  # again: writer threads of the failed save may have added files since
        remove_temporaries(self.model_dir)
      else:
        self._errors.remove()

  def _close_manager(self) -> None:
    if self.manager is not None:
      with contextlib.suppress(Exception):  # a failed save's error is reported by _confirm
        self.manager.close()
      self.manager = None
