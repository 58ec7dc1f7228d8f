"""scripts/reproduce.py end to end in its reduced (--quick) form: real training runs through the
CLI, the JSON report and the plot, and the direction of an effect that holds for every seed."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import reproduce  # pylint: disable=wrong-import-position


def test_steps_to_reach_interpolates():
  # Independent arithmetic: the curve crosses 2.5 halfway between steps 200 and 300.
  assert reproduce.steps_to_reach([100, 200, 300], [4.0, 3.0, 2.0], 2.5) == 250.0
  assert reproduce.steps_to_reach([100, 200], [4.0, 3.0], 1.0) is None


def test_run_summary_compares_cross_entropy_not_total_loss(tmp_path):
  # Regression: the eval figure was the total loss, which for an MoE model adds the load-balance
  # and router z-losses (~0.01 nats here) and biased every Switch-vs-dense comparison.
  rows = [{"step": 10, "split": "train", "cross_ent_loss": 5.0, "tokens_per_second": 100.0},
          {"step": 10, "split": "eval", "eval/t/loss": 4.51, "eval/t/cross_ent_loss": 4.5,
           "eval/t/accuracy": 0.3}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  summary = reproduce.run_summary(str(tmp_path), None)
  assert summary["final_eval_loss"] == 4.5 and summary["eval_loss"] == [4.5]


def test_every_claim_names_existing_gins():
  root = os.path.dirname(os.path.dirname(__file__))
  for name, claim in reproduce.CLAIMS.items():
    for variant in claim.variants:
      for scale in reproduce.SCALES:
        cmd = reproduce.train_command(claim, variant, 0, 10, scale, False)
        gin_file = next(a for a in cmd if a.startswith("--gin_file=gin/models/"))
        assert os.path.isfile(os.path.join(root, gin_file.split("=", 1)[1])), (name, gin_file)


def test_capacity_factor_quick_drops_fewer_tokens_with_more_capacity(tmp_path):
  # Three real 60-step runs through the CLI; the direction held for seeds 0 and 1 when written.
  report = reproduce.reproduce("capacity_factor", seeds=[0], quick=True,
                               runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "out"),
                               log=lambda _: None)
  saved = json.load(open(tmp_path / "out" / "capacity_factor.json"))
  assert saved["figures"] == json.loads(json.dumps(report["figures"]))
  assert os.path.getsize(tmp_path / "out" / "capacity_factor.png") > 10_000
  dropped = [report["figures"]["fraction_dropped"][f"cf {cf}"] for cf in (1.0, 1.25, 2.0)]
  assert dropped[0] > dropped[1] > dropped[2] >= 0.0
  assert all(np.isfinite(list(report["figures"]["final_eval_loss"].values())))
  assert len(saved["commands"]) == 3 and "moe_jax.train" in saved["commands"][0]
