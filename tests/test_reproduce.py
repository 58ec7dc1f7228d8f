"""scripts/reproduce.py end to end in its reduced (--quick) form: real training runs through the
CLI, the JSON report and the plot, and the direction of an effect that holds for every seed."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import claims  # pylint: disable=wrong-import-position
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
  summary = claims.run_summary(str(tmp_path), None)
  assert summary["final_eval_loss"] == 4.5 and summary["eval_loss"] == [4.5]


def test_every_claim_names_existing_gins_and_analysis(tmp_path):
  root = os.path.dirname(os.path.dirname(__file__))
  for name, claim in reproduce.CLAIMS.items():
    assert claim.analysis in reproduce.ANALYSES, name
    for scale in reproduce.SCALES:
      for run in claims.plan(claim, claim.seeds, 10, scale, False, str(tmp_path)):
        for gin_file in (a.split("=", 1)[1] for a in run.cmd if a.startswith("--gin_file=")):
          assert os.path.isfile(os.path.join(root, gin_file)), (name, run.label, gin_file)


def test_load_balance_quick_evens_the_expert_load(tmp_path):
  # Two real 60-step runs through the CLI (prefix LM). Without the aux loss the expert load is
  # more uneven from the first steps on: mean CV 1.48 vs 0.98 (seed 0) and 1.63 vs 0.94 (seed 1)
  # when written. (The
  # span-corruption version of this test checked that more capacity drops fewer tokens; on the
  # prefix LM at 60 steps that order flips between runs, whose routing diverges.)
  report = reproduce.reproduce("load_balance", seeds=[0], quick=True,
                               runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "out"),
                               log=lambda _: None)
  saved = json.load(open(tmp_path / "out" / "load_balance.json"))
  assert saved["figures"] == json.loads(json.dumps(report["figures"]))
  assert os.path.getsize(tmp_path / "out" / "load_balance.png") > 10_000
  cv = report["figures"]["mean_load_cv"]
  assert cv["aux 0"] > 1.25 * cv["aux 0.01"] > 0.0
  assert all(np.isfinite(list(report["figures"]["final_eval_loss"].values())))
  assert len(saved["commands"]) == 2 and "moe_jax.train" in saved["commands"][0]


def test_upcycling_quick_trains_on_from_the_stage_one_checkpoints(tmp_path):
  # Seven real 20-step runs through the CLI: dense and Switch, both trained on from their
  # checkpoints, the dense checkpoint upcycled with its optimizer state and with a fresh one,
  # and the dense model trained on from its params alone (a fresh optimizer state).
  report = reproduce.reproduce("upcycling", steps=20, quick=True, runs_dir=str(tmp_path / "runs"),
                               out=str(tmp_path / "out"), log=lambda _: None)
  saved = json.load(open(tmp_path / "out" / "upcycling.json"))
  assert saved["figures"] == json.loads(json.dumps(report["figures"]))
  assert os.path.getsize(tmp_path / "out" / "upcycling.png") > 10_000
  dense, dense_on, switch, switch_on, upcycled, upcycled_fresh, dense_fresh = saved["commands"]
  model_dir = lambda cmd: cmd.split("MODEL_DIR=")[1].strip("'\"")  # noqa: E731
  for first, on in ((dense, dense_on), (switch, switch_on)):
    assert "runs/pretrain.gin" in first and "runs/continue_pretrain.gin" in on
    assert f"INITIAL_CHECKPOINT_PATH='{model_dir(first)}/checkpoint_20'" in on
    assert "TRAIN_STEPS=40" in on
  assert "t5_tiny.gin" in dense and "switch_tiny.gin" in upcycled
  assert "runs/sparse_upcycle.gin" in upcycled
  assert f"INITIAL_CHECKPOINT_PATH='{model_dir(dense)}/checkpoint_20'" in upcycled
  assert "LEARNING_RATE_START_STEP=20" in upcycled
  assert "INITIAL_CHECKPOINT_MODE='upcycle'" in upcycled
  assert upcycled_fresh == upcycled.replace("INITIAL_CHECKPOINT_MODE='upcycle'",
                                            "INITIAL_CHECKPOINT_MODE='upcycle_params'").replace(
      model_dir(upcycled), model_dir(upcycled_fresh))
  assert "runs/continue_pretrain.gin" in dense_fresh and "t5_tiny.gin" in dense_fresh
  assert f"INITIAL_CHECKPOINT_PATH='{model_dir(dense)}/checkpoint_20'" in dense_fresh
  assert "INITIAL_CHECKPOINT_MODE='params'" in dense_fresh

  def train_steps(cmd):
    with open(os.path.join(model_dir(cmd), "metrics.jsonl")) as f:
      return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
  assert train_steps(dense_on)[0] == 21  # the step was restored: trained on
  assert train_steps(upcycled)[0] == train_steps(upcycled_fresh)[0] == 1  # a new model
  assert train_steps(dense_fresh)[0] == 21  # params and step restored, not the optimizer
  runs = saved["runs"]
  assert list(runs) == ["dense T5, trained on", "Switch from scratch",
                        "Switch upcycled from the dense checkpoint",
                        "Switch upcycled, fresh optimizer state",
                        "dense T5, trained on with a fresh optimizer state"]
  for label in list(runs)[:2]:
    assert runs[label]["eval_steps"] == list(range(2, 41, 2))
  for label in list(runs)[2:]:  # on the total step count
    assert runs[label]["eval_steps"] == list(range(22, 41, 2))
  final = {label: c["eval_xent"][-1] for label, c in runs.items()}
  assert saved["figures"]["upcycled_gain_over_dense"] == \
      final["dense T5, trained on"] - final["Switch upcycled from the dense checkpoint"]
  assert all(np.isfinite(list(final.values())))


def _write_metrics(model_dir, evals, tasks, tokens=100.0, seconds=None, load=None):
  """A finished run's metrics.jsonl: one train row and an eval row per (step, {task: xent});
  with `seconds`, eval rows written that many seconds after the run's start (started_at, as
  reproduce.py's run_one keeps it) and its load average at the start."""
  os.makedirs(model_dir, exist_ok=True)
  started = 1.8e9
  rows = [{"step": evals[-1][0], "split": "train", "cross_ent_loss": 5.0,
           "tokens_per_second": 100.0}]
  if seconds:
    for name, value in (("started_at", started), ("load_at_start", load)):
      with open(os.path.join(model_dir, name), "w") as f:
        f.write(f"{value}\n")
  for i, (step, xent) in enumerate(evals):
    row = {"step": step, "split": "eval", **({"time": started + seconds[i]} if seconds else {})}
    for task in tasks:
      row.update({f"eval/{task}/loss": xent[task] + 0.01, f"eval/{task}/cross_ent_loss": xent[task],
                  f"eval/{task}/num_tokens": tokens})
    rows.append(row)
  with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_languages_analysis_per_language_gaps_and_steps(tmp_path):
  # Two mixture runs with hand-made curves; every expected figure is worked out by hand.
  tasks = ["man_de_lm", "man_fr_lm"]
  curve = lambda at100, at200: [(100, dict(zip(tasks, at100))), (200, dict(zip(tasks, at200)))]
  dense = curve((4.0, 5.0), (3.0, 4.0))
  switch = curve((3.5, 5.2), (2.5, 4.1))
  # Both alone (load 0.2, 0.3 at start); dense evals at 50 s and 100 s, Switch at 60 s, 120 s.
  _write_metrics(tmp_path / "d", dense, tasks, seconds=(50.0, 100.0), load=0.2)
  _write_metrics(tmp_path / "s", switch, tasks, seconds=(60.0, 120.0), load=0.3)
  runs = {"dense": [claims.run_summary(str(tmp_path / "d"), 110.0)],
          "switch": [claims.run_summary(str(tmp_path / "s"), 130.0)]}
  # A mixture's eval loss is the mean over its tasks (each language counts once).
  assert runs["dense"][0]["eval_loss"] == [4.5, 3.5]
  f = reproduce._languages(claims.Trained(200, [], runs, []))
  v = f["variants"]["switch"]
  assert v["gap"] == pytest.approx({"de": 0.5, "fr": -0.1})
  assert (v["languages_ahead"], v["languages"]) == (1, 2)
  assert v["mean_gap"] == pytest.approx(0.2)
  # de: 3.5 -> 2.5 crosses the dense final 3.0 halfway; fr never reaches 4.0.
  assert v["steps_to_dense_final_per_language"] == {"de": 150.0, "fr": None}
  # Mean over languages: 4.35 -> 3.3 reaches 3.5 at 100 + 100 * 0.85 / 1.05.
  assert v["steps_to_dense_final"] == pytest.approx(100 + 100 * 0.85 / 1.05)
  # Measured time: Switch is there 0.85 / 1.05 of the way from its 60 s eval to its 120 s one;
  # dense took 100 s to its final eval (not its 110 s command: the end's checkpoint is not
  # training time).
  seconds = 60 + 60 * 0.85 / 1.05
  m = dict(v["time_to_dense_final_alone"][0])
  assert m.pop("load_at_start") == [0.2, 0.3]
  assert m == pytest.approx({"step_ratio": v["steps_to_dense_final"] / 200, "seconds": seconds,
                             "dense_seconds": 100.0, "ratio": seconds / 100})
  assert v["time_ratio"] == pytest.approx(seconds / 100)
  assert f["eval_tokens"] == {"de": 100.0, "fr": 100.0}
  text = reproduce._languages_text({"figures": f, "steps": 200, "seeds": [0]})
  assert "| de | 100 | 3.0000 | +0.5000 |" in text and "ahead in 1 of 2 languages" in text
  assert "1.09 of the wall-clock" in text


def test_languages_analysis_ratios_by_run_length(tmp_path):
  # As if the runs had stopped at each eval after the first; worked out by hand. Two languages
  # with the same curve, so the mean over languages is that curve.
  tasks = ["man_de_lm", "man_fr_lm"]
  curve = lambda *losses: [(step, dict.fromkeys(tasks, x)) for step, x in zip((100, 200, 300),
                                                                             losses)]
  _write_metrics(tmp_path / "d", curve(4.0, 3.0, 2.5), tasks, seconds=(10.0, 20.0, 30.0),
                 load=0.1)
  _write_metrics(tmp_path / "s", curve(3.6, 2.8, 2.2), tasks, seconds=(12.0, 24.0, 36.0),
                 load=0.1)
  runs = {"dense": [claims.run_summary(str(tmp_path / "d"), None)],
          "switch": [claims.run_summary(str(tmp_path / "s"), None)]}
  f = reproduce._languages(claims.Trained(300, [], runs, []))
  # At 200 the target is 3.0: Switch crosses it 0.6 / 0.8 of the way from 100 to 200 (step 175,
  # 21 s against dense's 20 s); at 300 it is 2.5: halfway from 200 to 300 (250, 30 s vs 30 s).
  by_length = f["variants"]["switch"]["by_length"]
  assert [b["steps"] for b in by_length] == [200, 300]
  assert [b["step_ratio"] for b in by_length] == pytest.approx([175 / 200, 250 / 300])
  assert [b["time_ratio"] for b in by_length] == pytest.approx([21 / 20, 30 / 30])
  text = reproduce._languages_text({"figures": f, "steps": 300, "seeds": [0]})
  assert "200: 0.88 / 1.05, 300: 0.83 / 1.00" in text


def test_time_to_reach_only_from_runs_alone_and_not_resumed(tmp_path):
  evals = [(100, {"t": 4.0}), (200, {"t": 3.0})]
  def summary(name, load, seconds=(50.0, 100.0)):
    _write_metrics(tmp_path / name, evals, ["t"], seconds=seconds, load=load)
    return claims.run_summary(str(tmp_path / name), None)
  alone = summary("alone", 0.1)
  assert reproduce.time_to_reach(alone, alone)["ratio"] == 1.0
  # A run beside another (load 1.2 at its start) is not a measurement of its time.
  assert reproduce.time_to_reach(alone, summary("loaded", 1.2)) is None
  # A run alone that never reaches the dense final loss (3.0): no time, the dense one's kept.
  _write_metrics(tmp_path / "behind", [(100, {"t": 4.0}), (200, {"t": 3.5})], ["t"],
                 seconds=(50.0, 100.0), load=0.1)
  behind = reproduce.time_to_reach(alone, claims.run_summary(str(tmp_path / "behind"), None))
  assert (behind["ratio"], behind["seconds"], behind["dense_seconds"]) == (None, None, 100.0)
  assert reproduce._time_ratio([behind, reproduce.time_to_reach(alone, alone)]) is None
  # A resumed run: its first eval row was written before this command started.
  resumed = summary("resumed", 0.1, seconds=(-500.0, 100.0))
  assert resumed["eval_seconds"] is None and reproduce.time_to_reach(alone, resumed) is None


def test_alone_starts_a_run_only_once_the_machine_is_idle(tmp_path, monkeypatch):
  # The load average the machine reports: busy twice (a run just ended), then idle.
  loads = iter([1.9, 0.8, 0.3])
  sleeps = []
  monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
  monkeypatch.setattr(claims.time, "sleep", sleeps.append)
  claims.run_one([sys.executable, "-c", "pass"], str(tmp_path / "run"), 10, alone=True)
  assert len(sleeps) == 2
  with open(tmp_path / "run" / "load_at_start") as f:
    assert float(f.read()) == 0.3  # what the run's time is judged by: below 0.5


def test_a_claim_with_a_data_gin_leaves_the_task_to_it(tmp_path):
  claim = reproduce.CLAIMS["multilingual"]
  for run in claims.plan(claim, (0,), 10, "tiny", False, str(tmp_path)):
    gins = [a for a in run.cmd if a.startswith("--gin_file=")]
    assert gins[-1] == "--gin_file=gin/runs/manpages.gin"
    assert not any("MIXTURE_OR_TASK_NAME" in a for a in run.cmd)


def test_torch_control_analysis_sets_both_gains_side_by_side(tmp_path):
  # The moe_jax runs and HF's output (as scripts/torch_control.py writes it) on disk, so the
  # analysis reads them instead of training; expected gains by hand.
  claim = reproduce.CLAIMS["torch_control_stdlib"]
  planned = claims.plan(claim, (0,), 200, "tiny", False, str(tmp_path))
  for run, final in zip(planned, (3.0, 3.1)):  # dense, Switch
    _write_metrics(run.model_dir, [(100, {"t": final + 1}), (200, {"t": final})], ["t"])
  out = tmp_path / "hf_pystdlib_prefix_lm_seed0"
  os.makedirs(out / "batches" / "train")
  np.save(out / "batches" / "train" / "decoder_loss_weights.npy", np.ones((2, 4, 8)))
  with open(out / "batches" / "meta.json", "w") as f:
    json.dump({}, f)
  hf = {"runs": [{"model": m, "eval_loss": x, "train_seconds": 8.0,
                  "eval_curve": [{"step": 100, "eval_loss": x + 1}, {"step": 200, "eval_loss": x}]}
                 for m, x in (("t5_tiny", 3.2), ("switch_tiny", 3.0))]}
  with open(out / "hf.json", "w") as f:
    json.dump(hf, f)
  runs = {r.label: [claims.run_summary(r.model_dir, 10.0)] for r in planned}
  f = reproduce._torch_control(claims.Trained(200, planned, runs, [], claim))
  assert list(runs) == ["moe_jax dense T5", "moe_jax Switch", "HF T5 (PyTorch)",
                        "HF Switch (PyTorch)"]
  assert f["switch_gain"] == pytest.approx({"moe_jax": -0.1, "HF": 0.2})
  assert f["switch_steps_to_dense_final"]["moe_jax"] is None
  assert f["switch_steps_to_dense_final"]["HF"] == pytest.approx(180.0)
  assert f["final_eval_loss"]["HF T5 (PyTorch)"] == 3.2
  assert runs["HF Switch (PyTorch)"][0]["tokens_per_second"] == 64 / 8.0
