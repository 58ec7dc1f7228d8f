"""moe_jax: Switch Transformer / GShard Mixture-of-Experts models in JAX and Flax."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
from typing import Any, Iterator

__version__ = "0.1.0"

# TensorFlow's C++ INFO logs off (jax sets the same default when it is imported first); its
# warnings and errors stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# What TensorFlow prints from C++ while its libraries load and it first looks for GPUs: before
# absl's logging is initialized, so no log level hides it. On a host without a GPU this includes
# an error ("failed call to cuInit") that is no failure of the run: TF only feeds data here.
TF_START_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:.]+ +\d+ (port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized)"
    r"|To enable the following instructions: .*rebuild TensorFlow")


@contextlib.contextmanager
def stderr_without(noise: re.Pattern) -> Iterator[None]:
  """Passes every line written to file descriptor 2 inside the block (by C++ or Python, any
  thread) on to the real stderr as it comes, except the lines that `noise` matches."""
  sys.stderr.flush()
  try:
    real = os.dup(2)
  except OSError:  # no stderr to filter
    yield
    return
  read, write = os.pipe()
  os.dup2(write, 2)
  os.close(write)

  def forward() -> None:
    with os.fdopen(read, "rb") as pipe, os.fdopen(os.dup(real), "wb", buffering=0) as out:
      for line in pipe:
        if not noise.match(line.decode(errors="replace")):
          out.write(line)
  thread = threading.Thread(target=forward, name="moe_jax-stderr", daemon=True)
  thread.start()
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(real, 2)  # drops the pipe's last write end: `forward` reads to its end and stops
    thread.join()
    os.close(real)


@functools.cache
def import_tensorflow() -> Any:
  """The `tensorflow` module for the input pipeline and TensorBoard writers, imported without
  its start-up notices (real warnings and errors pass) and with the GPUs hidden from it: JAX
  owns the accelerators. Import it through this before seqio, clu or tensorflow_datasets."""
  with stderr_without(TF_START_NOISE):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
      tf.config.set_visible_devices([], "GPU")  # finds the devices now, inside the filter
    except RuntimeError:  # TF already initialised its devices elsewhere; nothing left to hide
      pass
  return tf
