"""Bad settings through the command line: one line `<prog>: error: <setting>: ...`, exit status
2, no traceback, nothing compiled. The cases and their messages are the table of
docs/reliability.md, so the table and the real messages cannot drift apart."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from moe_jax import eval as eval_lib
from moe_jax import infer as infer_lib
from moe_jax import loop
from moe_jax import run_config
from moe_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
BASE = {
    "train": ["--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
              LENGTHS, "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0",
              '--gin.MODEL_DIR="<tmp>/run"', "--gin.TRAIN_STEPS=1"],
    "eval": ["--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/eval.gin", LENGTHS,
             "--gin.BATCH_SIZE=8", '--gin.CHECKPOINT_PATH="<ckpt>"', "--gin.EVAL_STEPS=1"],
    "infer": ["--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/infer.gin", LENGTHS,
              "--gin.BATCH_SIZE=8", '--gin.CHECKPOINT_PATH="<ckpt>"', "--gin.MAX_BATCHES=1"],
}
MAINS = {"train": train.main, "eval": eval_lib.main, "infer": infer_lib.main}


def documented_cases():
  """(cmd, flags, message) of each row of docs/reliability.md's validation table."""
  with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
    rows = [line for line in f if re.match(r"\| (train|eval|infer) \|", line)]
  cases = []
  for row in rows:
    cmd, flags, message = (c.strip() for c in row.strip().strip("|").split(" | "))
    cases.append((cmd, re.findall(r"`([^`]*)`", flags), message.strip("`")))
  return cases


CASES = documented_cases()


def argv(cmd, flags, tmp, ckpt):
  """BASE[cmd] with the row's flags (as typed in a shell); a row's own model or run gin
  replaces the base one."""
  flags = [arg for flag in flags for arg in shlex.split(flag)]
  base = list(BASE[cmd])
  for kind in ("models", "runs"):
    if any(f.startswith(f"--gin_file=gin/{kind}/") for f in flags):
      base = [f for f in base if not f.startswith(f"--gin_file=gin/{kind}/")]
  return [f.replace("<tmp>", str(tmp)).replace("<ckpt>", ckpt) for f in base + flags]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A switch_tiny checkpoint_0 (initialization only, nothing trained)."""
  model_dir = tmp_path_factory.mktemp("ckpt")
  train.run(loop.train, BASE["train"][:5] + [f'--gin.MODEL_DIR="{model_dir}"',
                                                "--gin.TRAIN_STEPS=0"], "moe_jax.train")
  return str(model_dir / "checkpoint_0")


@pytest.fixture
def files(tmp_path):
  (tmp_path / "bad.model").write_bytes(b"\x00not a sentencepiece model\xff" * 10)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
  (tmp_path / "good.txt").write_text("a line of text\n" * 10)
  (tmp_path / "afile").write_text("a file, not a directory")
  return tmp_path


def test_the_documented_table_lists_the_cases():
  assert len(CASES) >= 60
  assert {c[0] for c in CASES} == {"train", "eval", "infer"}


@pytest.mark.parametrize("cmd, flags, message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_setting_is_one_line_with_status_2(cmd, flags, message, files, ckpt, capsys):
  with pytest.raises(SystemExit) as exit_info:
    MAINS[cmd](argv(cmd, flags, files, ckpt))
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert exit_info.value.code == 2, captured.err
  assert "Traceback" not in captured.err
  line = lines[-1]
  assert sum(f"moe_jax.{cmd}: error:" in x for x in lines) == 1, captured.err
  message = message.replace("<tmp>", str(files)).replace("<ckpt>", ckpt)
  expected = f"moe_jax.{cmd}: error: {message}"
  if expected.endswith("…"):
    assert line.startswith(expected[:-1]), line
  else:
    assert line == expected
  assert not os.path.exists(files / "run" / "checkpoint_0")  # nothing was trained or saved


@pytest.mark.parametrize("flags", [['--gin.TRAIN_STEPS="abc"'], ["--gin.GROUP_SIZE=0"],
                                   ["--gin.KEEP_CHECKPOINTS=0"]])
def test_subprocess_exit_status_2_and_one_line(flags, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "moe_jax.train", *argv("train", flags, tmp_path, "")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [x for x in proc.stderr.splitlines() if "moe_jax.train" in x]
  assert len(lines) == 1 and lines[0].startswith("moe_jax.train: error: "), proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == lines[0]
  assert proc.stdout == ""


def test_verbose_shows_the_traceback(capsys):
  with pytest.raises(Exception, match="TRAIN_STEPS: must be an integer >= 0"):
    train.main(BASE["train"] + ["--gin.TRAIN_STEPS=-1", "--verbose"])


def test_python_api_raises_the_same_text(monkeypatch):
  from moe_jax import config, validation  # pylint: disable=import-outside-toplevel
  model = config.build_model(["gin/models/switch_tiny.gin"])
  with pytest.raises(validation.SettingError) as error:
    loop.train(model=model, model_dir="/nonexistent", total_steps=1,
               dataset_cfg=run_config.DatasetConfig(
                   mixture_or_task_name="pydocs_span_corruption",
                   task_feature_lengths={"inputs": 32, "targets": 8}, batch_size=8),
               stats_period=0)
  # gin appends "In call to configurable 'train'" on a line of its own.
  assert str(error.value).splitlines()[0] == "STATS_PERIOD: must be an integer >= 1, got 0"


def test_resuming_with_another_model_stops_and_keeps_the_checkpoint(ckpt, tmp_path, capsys):
  """A MODEL_DIR whose checkpoint is of another model (gshard_tiny on switch_tiny's): one line,
  status 2, and the checkpoint is left as it was (not taken for a corrupt one)."""
  shutil.copytree(os.path.dirname(ckpt), tmp_path / "run")
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv("train", ["--gin_file=gin/models/gshard_tiny.gin"], tmp_path, ckpt))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      f"moe_jax.train: error: MODEL_DIR: {tmp_path}/run/checkpoint_0 was saved by a different "
      "model: decoder.moe.router_top_k 1 vs 2")
  assert sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint")) == [
      "checkpoint_0"]


def test_a_checkpoint_without_description_loads_with_a_note_and_its_shapes_checked(
    ckpt, tmp_path, capsys, caplog):
  """Checkpoints written before the description existed (or converted from HF) lack it."""
  old = tmp_path / "old" / "checkpoint_0"
  shutil.copytree(ckpt, old)
  shutil.rmtree(old / "model")
  eval_lib.main(argv("eval", ["--gin_file=gin/models/gshard_tiny.gin"], tmp_path, str(old)))
  assert "Evaluated step 0:" in capsys.readouterr().out
  assert any(f"{old} has no model description" in r.getMessage() for r in caplog.records)
  with pytest.raises(SystemExit) as exit_info:
    eval_lib.main(argv("eval", ["--gin.NUM_EXPERTS=16"], tmp_path, str(old)))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"moe_jax.eval: error: CHECKPOINT_PATH: {old} holds decoder/layers_1/mlp/router/w of "
      "shape (128, 8), the model expects (128, 16) (expert count 8 vs NUM_EXPERTS=16)")
