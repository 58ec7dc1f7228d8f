"""The trainer for real across two JAX processes (gloo CPU collectives, 4 devices each): switch_tiny
on a 2x4 (data x expert) mesh, each process reading only its own shard of every batch, reaches
the same losses as one process with 8 devices reading both shards."""
import json
import os
import sys

import numpy as np

import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model_dir, num_processes: int) -> list[float]:
  command = [sys.executable, "-m", "moe_jax.train", "--gin_file=gin/models/switch_tiny.gin",
             "--gin_file=gin/runs/pretrain.gin", f'--gin.MODEL_DIR="{model_dir}"',
             "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.STATS_PERIOD=1",
             "--gin.EVAL_PERIOD=0", "--gin.NUM_EXPERT_PARTITIONS=4", "--gin.NUM_DATA_SHARDS=2",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
  stdouts = multihost_worker.launch(command, num_processes=num_processes,
                                    devices_per_process=8 // num_processes, timeout=420,
                                    cwd=ROOT)
  assert "Finished at step 4" in stdouts[0]
  assert (model_dir / "checkpoint_4").is_dir()
  rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r.get("split") == "train"]


def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
  two = _train(tmp_path / "two", num_processes=2)
  one = _train(tmp_path / "one", num_processes=1)
  assert len(two) == 4 and np.isfinite(two).all()
  assert two[-1] < two[0]
  np.testing.assert_allclose(two, one, rtol=1e-5)
