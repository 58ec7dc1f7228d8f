"""Command-line entry points: t5x flag semantics and one-line errors before anything is built."""
import os
import subprocess
import sys

import gin
import pytest

from moe_jax import eval as eval_lib
from moe_jax import infer as infer_lib
from moe_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "--gin_file=gin/models/switch_tiny.gin"
PRETRAIN = "--gin_file=gin/runs/pretrain.gin"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)  # gin file names in the flags are repo-relative, as in the README


def _error_line(capsys, main, argv) -> str:
  """Runs an entry point that must fail; returns its stderr, checked to be one line."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def test_gin_flags_t5x_semantics():
  """--gin.X=v is a binding; later files and bindings override earlier ones."""
  args = train.parse_flags([MODEL, PRETRAIN, "--gin.TRAIN_STEPS=7", "--gin.NUM_EXPERTS=4",
                            "--gin_bindings=BATCH_SIZE = 16", '--gin.MODEL_DIR="/tmp/x"'],
                           "moe_jax.train")
  assert args.gin_files == ["gin/models/switch_tiny.gin", "gin/runs/pretrain.gin"]
  train.parse_gin(args.gin_files, args.gin_bindings, args.gin_search_paths)
  assert gin.query_parameter("%TRAIN_STEPS") == 7
  assert gin.query_parameter("%NUM_EXPERTS") == 4  # model gin's 8, overridden
  assert gin.query_parameter("%BATCH_SIZE") == 16
  assert gin.query_parameter("%MODEL_DIR") == "/tmp/x"
  assert gin.query_parameter("%EMBED_DIM") == 128  # switch_tiny.gin overrides switch_base.gin


@pytest.mark.parametrize("run, bindings", [
    ("pretrain", []),
    ("finetune", ['MODEL_DIR="/x"', 'INITIAL_CHECKPOINT_PATH="/y"', "TRAIN_STEPS=9"]),
    ("continue_pretrain", ['MODEL_DIR="/x"', 'INITIAL_CHECKPOINT_PATH="/y"', "TRAIN_STEPS=9"]),
    ("sparse_upcycle", ['MODEL_DIR="/x"', 'INITIAL_CHECKPOINT_PATH="/y"']),
    ("eval", ['CHECKPOINT_PATH="/y"']),
    ("infer", ['CHECKPOINT_PATH="/y"']),
])
def test_run_gins_parse_with_their_required_macros(run, bindings):
  train.parse_gin(["gin/models/switch_tiny.gin", f"gin/runs/{run}.gin"], bindings)


def test_run_gins_parse_next_to_a_runs_directory(tmp_path, monkeypatch):
  """After the default run, ./runs/ sits in the working directory (on sys.path under python -m)
  and is importable as a namespace package; gin's include lookup crashes on such a package, so
  the run gins include nothing."""
  (tmp_path / "runs" / "switch_tiny").mkdir(parents=True)
  monkeypatch.syspath_prepend(str(tmp_path))
  train.parse_gin(["gin/models/switch_tiny.gin", "gin/runs/finetune.gin"],
                  ['MODEL_DIR="/x"', 'INITIAL_CHECKPOINT_PATH="/y"', "TRAIN_STEPS=9"])


def test_includes_work_next_to_a_models_directory_parse_after_parse(tmp_path, monkeypatch):
  """A user's own ./models/ folder must not shadow the package's `include 'models/...'`, also
  when gin is parsed again in the same process (notebooks, benchmarks)."""
  (tmp_path / "models").mkdir()
  (tmp_path / "mine.gin").write_text("include 'models/switch_tiny.gin'\nNUM_EXPERTS = 4\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  for _ in range(2):
    train.parse_gin(["mine.gin", "runs/pretrain.gin"], [])
    assert gin.query_parameter("%NUM_EXPERTS") == 4


def test_model_dir_defaults_to_model_name():
  train.parse_gin(["gin/models/switch_tiny.gin", "gin/runs/pretrain.gin"], [],
                  default_model_dir=True)
  assert gin.query_parameter("%MODEL_DIR") == os.path.join(".", "runs", "switch_tiny")


def test_search_paths_find_files_by_relative_name(tmp_path):
  (tmp_path / "mine.gin").write_text("TRAIN_STEPS = 3\n")
  train.parse_gin(["models/switch_tiny.gin", "runs/pretrain.gin", "mine.gin"], [],
                  search_paths=str(tmp_path))
  assert gin.query_parameter("%TRAIN_STEPS") == 3


def test_unknown_macro_is_one_line(capsys):
  line = _error_line(capsys, train.main, [MODEL, PRETRAIN, "--gin.TRAIN_STEP=10"])
  assert line.startswith("moe_jax.train: error: unknown macro TRAIN_STEP")
  assert "TRAIN_STEPS" in line  # lists the macros that do exist


def test_bad_binding_is_one_line(capsys):
  line = _error_line(capsys, train.main, [MODEL, PRETRAIN, "--gin.loop.train.nonsense=1"])
  assert "nonsense" in line and line.startswith("moe_jax.train: error:")


def test_syntax_error_is_one_line(capsys):
  line = _error_line(capsys, train.main, [MODEL, PRETRAIN, "--gin.BATCH_SIZE=(8"])
  assert line.startswith("moe_jax.train: error:")


def test_undefined_macro_reference_is_one_line(capsys):
  line = _error_line(capsys, train.main,
                     [MODEL, PRETRAIN,
                      "--gin_bindings=run_config.DatasetConfig.batch_size = %NOPE"])
  assert "NOPE" in line


def test_missing_gin_file_is_one_line(capsys):
  line = _error_line(capsys, train.main, ["--gin_file=gin/models/no_such_model.gin", PRETRAIN])
  assert "no_such_model.gin" in line


def test_unknown_flag_is_one_line(capsys):
  line = _error_line(capsys, train.main, [MODEL, PRETRAIN, "--train_steps=3"])
  assert "--train_steps" in line


def test_missing_required_binding_is_one_line(capsys):
  line = _error_line(capsys, eval_lib.main, [MODEL, "--gin_file=gin/runs/eval.gin"])
  assert line == "moe_jax.eval: error: CHECKPOINT_PATH is required: pass --gin.CHECKPOINT_PATH=..."
  line = _error_line(capsys, infer_lib.main, [MODEL, "--gin_file=gin/runs/infer.gin"])
  assert "CHECKPOINT_PATH is required" in line


def test_finetune_requires_a_checkpoint(capsys):
  line = _error_line(capsys, train.main, [MODEL, "--gin_file=gin/runs/finetune.gin",
                                          '--gin.MODEL_DIR="/tmp/unused"', "--gin.TRAIN_STEPS=9"])
  assert "INITIAL_CHECKPOINT_PATH is required" in line


def test_subprocess_exit_status_and_single_error_line():
  """The real command: status 2, one error line at the end of stderr, no traceback, nothing
  trained. (Libraries may log their own start-up lines before it, e.g. TensorFlow's CUDA
  probe when a gin file imports moe_jax.data.)"""
  proc = subprocess.run(
      [sys.executable, "-m", "moe_jax.train", MODEL, PRETRAIN, "--gin.TRAIN_STEP=10"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("moe_jax.train: error: unknown macro TRAIN_STEP"), proc.stderr
  assert sum("moe_jax.train" in line for line in lines) == 1
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""
