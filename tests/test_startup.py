"""What a user sees first: the command lines' own lines, not TensorFlow's C++ start-up notices
("Could not find cuda drivers", "oneDNN custom operations are on", "failed call to cuInit")
that it prints while loading on a host without a GPU, before any log level applies. Real
warnings and errors still show. The runs are real subprocesses without TF_CPP_MIN_LOG_LEVEL
(conftest sets it for the other tests), as a user starts them."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin_file=gin/models/switch_tiny.gin", "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
# TensorFlow 2.21's notices on this kind of host, as it prints them without the filter.
NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations|"
                   r"Could not find cuda drivers|failed call to cuInit|cpu_feature_guard")


def _user_env():
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return env


def _run(args, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=_user_env(), capture_output=True,
                        text=True, timeout=timeout)


def _no_noise(proc):
  for stream in (proc.stdout, proc.stderr):
    assert not NOISE.search(stream), stream[:3000]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A one-step switch_tiny run on 8 CPU devices: each batch of 8 rows x 8 targets gives each
  of the 8 batch partitions 8 decoder tokens, fewer than GROUP_SIZE (1024): a real warning."""
  model_dir = tmp_path_factory.mktemp("run")
  return _run(["-m", "moe_jax.train", *TINY, "--gin_file=gin/runs/pretrain.gin",
               f'--gin.MODEL_DIR="{model_dir}"', "--gin.TRAIN_STEPS=1", "--gin.EVAL_PERIOD=0"])


def test_train_first_lines_are_the_projects_and_its_warning_shows(tiny_run):
  assert tiny_run.returncode == 0, tiny_run.stderr[-3000:]
  _no_noise(tiny_run)
  first = tiny_run.stderr.splitlines()[0]
  assert first.startswith("WARNING:absl:GROUP_SIZE is more than a training batch gives each "
                          "group"), tiny_run.stderr[:3000]
  assert re.fullmatch(r"Finished at step 1 in \d+s\.", tiny_run.stdout.splitlines()[0])


@pytest.mark.parametrize("prog, run_gin, flag", [
    ("train", "pretrain", "--gin.MIXTURE_OR_TASK_NAME='no_such_task'"),
    ("eval", "eval", "--gin.CHECKPOINT_PATH='/nonexistent/checkpoint_1'"),
    ("infer", "infer", "--gin.CHECKPOINT_PATH='/nonexistent/checkpoint_1'"),
])
def test_an_error_after_tensorflow_started_is_the_first_line(prog, run_gin, flag, tmp_path):
  """Each error comes after the input pipeline (TensorFlow) started: the task is looked up, or
  the task is checked before the checkpoint."""
  proc = _run(["-m", f"moe_jax.{prog}", *TINY, f"--gin_file=gin/runs/{run_gin}.gin", flag,
               f'--gin.MODEL_DIR="{tmp_path}/run"' if prog == "train" else
               f'--gin.EVAL_OUTPUT_DIR="{tmp_path}/out"' if prog == "eval" else
               f'--gin.INFER_OUTPUT_DIR="{tmp_path}/out"'])
  assert proc.returncode == 2, proc.stderr[-3000:]
  _no_noise(proc)
  lines = proc.stderr.splitlines()
  setting = "MIXTURE_OR_TASK_NAME" if prog == "train" else "CHECKPOINT_PATH"
  assert len(lines) == 1 and lines[0].startswith(f"moe_jax.{prog}: error: {setting}: "), lines
  assert proc.stdout == ""


# Writes, inside the filter of moe_jax.import_tensorflow, one of TF's notices and real lines
# from C++ (straight to file descriptor 2) and Python (a warning), then one after it.
_FILTERED = r"""
import os, warnings
import moe_jax
with moe_jax.stderr_without(moe_jax.TF_START_NOISE):
  os.write(2, b"I0000 00:00:1796594630.344580    5070 cudart_stub.cc:31] Could not find cuda "
              b"drivers on your machine, GPU will not be used.\n")
  os.write(2, b"E0000 00:00:1796594633.559116    5070 some_op.cc:12] a real error\n")
  warnings.warn("a real Python warning")
print("after", file=__import__("sys").stderr)
"""


def test_the_filter_drops_only_the_notices():
  proc = _run(["-c", _FILTERED], timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.splitlines()
  assert lines[0] == "E0000 00:00:1796594633.559116    5070 some_op.cc:12] a real error"
  assert lines[1].endswith("UserWarning: a real Python warning")
  assert lines[-1] == "after" and "cuda" not in proc.stderr


def test_tensorflow_itself_starts_quietly_and_sees_no_gpu():
  proc = _run(["-c", "import moe_jax; tf = moe_jax.import_tensorflow(); "
                     "print(tf.config.get_visible_devices('GPU'), tf.constant(2) * 3)"],
              timeout=300)
  assert proc.returncode == 0, proc.stderr
  _no_noise(proc)
  assert proc.stderr == ""
  assert proc.stdout.startswith("[] tf.Tensor(6, shape=(), dtype=int32)")
