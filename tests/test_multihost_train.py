"""The trainer for real across two JAX processes (gloo CPU collectives, 4 devices each): switch_tiny
on a 2x4 (data x expert) mesh, each process reading only its own shard of every batch."""
import json
import os
import sys

import numpy as np

import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_training_on_a_data_by_expert_mesh(tmp_path):
  model_dir = tmp_path / "run"
  command = [sys.executable, "-m", "moe_jax.train", "--gin_file=gin/models/switch_tiny.gin",
             "--gin_file=gin/runs/pretrain.gin", f'--gin.MODEL_DIR="{model_dir}"',
             "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.STATS_PERIOD=1",
             "--gin.EVAL_PERIOD=0", "--gin.NUM_EXPERT_PARTITIONS=4",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
  stdouts = multihost_worker.launch(command, num_processes=2, devices_per_process=4,
                                    timeout=420, cwd=ROOT)
  assert "Finished at step 4" in stdouts[0]
  rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if r.get("split") == "train"]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert (model_dir / "checkpoint_4").is_dir()
