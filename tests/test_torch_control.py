"""scripts/torch_control.py: the batches it exports are the trainer's stream, the HF models it
builds have moe_jax's sizes (parameter counts of the gin models), its loss terms are HF's own,
and a reduced run (3 steps, both models) writes its table."""
import argparse
import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest
import torch

from moe_jax import config, evaluation, models

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
TASK = "pydocs_span_corruption"
LENGTHS = {"inputs": 32, "targets": 8}
BATCH, STEPS, EVAL_STEPS = 4, 3, 2


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "torch_control", os.path.join(REPO, "scripts", "torch_control.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tc():
  return _load_script()


@pytest.fixture(scope="module")
def exported(tc, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("batches"))
  tc.main(["export", "--task", TASK, "--out", out, "--steps", str(STEPS), "--batch_size",
           str(BATCH), "--inputs_length", str(LENGTHS["inputs"]), "--targets_length",
           str(LENGTHS["targets"]), "--eval_steps", str(EVAL_STEPS)])
  return out


@pytest.fixture(scope="module")
def result(tc, exported, tmp_path_factory):
  out = os.path.join(str(tmp_path_factory.mktemp("control")), "control.json")
  tc.main(["train", "--data", exported, "--out", out, "--models", "switch_tiny,t5_tiny",
           "--seeds", "0", "--threads", "1"])
  with open(out) as f:
    return json.load(f)


def test_export_is_the_trainers_training_stream(tc, exported):
  meta, parts = tc.load_batches(exported)
  assert meta["eval_tasks"] == [TASK] and meta["vocab_size"] == 2100
  # The trainer's own account of the batches a run of seed 0 trains on at steps 1, 2, 3.
  stream = list(evaluation.eval_batches(TASK, task_feature_lengths=LENGTHS, batch_size=BATCH,
                                     eval_steps=STEPS, pack=False, seed=0, train_stream_from=0))
  for k in tc.FEATURES:
    np.testing.assert_array_equal(parts["train"][k], np.stack([b[k] for b in stream]))
  for part in parts.values():
    enc, dec_in, tgt, w = (part[k] for k in tc.FEATURES)
    assert enc.shape == (len(enc), BATCH, LENGTHS["inputs"])
    assert tgt.shape == (len(tgt), BATCH, LENGTHS["targets"])
    # Teacher forcing: decoder inputs are the targets shifted right after a 0; weights mark
    # the real target tokens.
    np.testing.assert_array_equal(dec_in[..., 0], 0)
    np.testing.assert_array_equal(dec_in[..., 1:] * (tgt[..., 1:] > 0), tgt[..., :-1] *
                                  (tgt[..., 1:] > 0))
    np.testing.assert_array_equal(w, tgt > 0)
    assert enc.max() < meta["vocab_size"] and w.sum() > 0
  assert parts[f"validation/{TASK}"]["encoder_input_tokens"].shape[0] == EVAL_STEPS


@pytest.mark.parametrize("name", ["switch_tiny", "t5_tiny"])
def test_hf_models_have_the_gin_models_sizes(tc, name):
  spec = tc.hf_model_spec(name, 2100)
  hf = tc.build_hf_model(spec, 0)
  model = config.build_model([f"models/{name}.gin"], ["VOCAB_SIZE = 2100"])
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  # Same layers, widths, experts, sparse layers and tied embedding: the same parameter count.
  assert sum(p.numel() for p in hf.parameters()) == models.count_params(abstract)
  assert hf.lm_head.weight is hf.shared.weight
  assert hf.config.d_model == model.module.config.emb_dim
  if name == "switch_tiny":
    assert [b.is_sparse for b in hf.encoder.block] == [False, True]
    assert [b.is_sparse for b in hf.decoder.block] == [False, True]
    assert hf.config.router_jitter_noise == 0.0
    # ceil(1.25 · 32 / 8) = 5 tokens per expert per 32-token sequence in training, 2.0 -> 8 in
    # eval; 8-token decoder sequences get the minimum 4.
    assert [tc.capacity(spec, 32, True), tc.capacity(spec, 32, False),
            tc.capacity(spec, 8, True)] == [5, 8, 4]


def test_loss_terms_equal_hf_own_losses(tc, exported):
  meta, parts = tc.load_batches(exported)
  spec = tc.hf_model_spec("switch_tiny", meta["vocab_size"])
  hf = tc.build_hf_model(spec, 1).eval()
  tc.set_capacity(hf, spec, meta["task_feature_lengths"], train=False)
  batch = {k: torch.from_numpy(v[0]) for k, v in parts["train"].items()}
  with torch.no_grad():
    mine = tc.losses(hf, dict(spec, losses=dict(spec["losses"], z_loss=0.0)), batch)
    with_z = tc.losses(hf, spec, batch)
  labels = batch["decoder_target_tokens"].long().masked_fill(batch["decoder_loss_weights"] == 0,
                                                              -100)
  with torch.no_grad():
    out = hf(input_ids=batch["encoder_input_tokens"].long(),
             attention_mask=(batch["encoder_input_tokens"] > 0).long(),
             decoder_input_ids=batch["decoder_input_tokens"].long(),
             decoder_attention_mask=(batch["decoder_target_tokens"] > 0).long(),
             labels=labels, output_router_logits=True)
  aux_factor = spec["losses"]["aux_loss_factor"]
  assert spec["losses"]["aux_loss_layers"] == "mean" and aux_factor == 0.01
  # HF's cross-entropy ignores the -100 labels: the weighted mean over real tokens.
  expected_ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(),
                                                  ignore_index=-100)
  assert float(mine["cross_ent_loss"]) == pytest.approx(float(expected_ce), rel=1e-5)
  # One sparse layer per stack: HF's per-stack losses are the per-layer ones; moe_jax averages.
  expected_aux = aux_factor * (float(out.encoder_aux_loss) + float(out.decoder_aux_loss)) / 2
  assert float(mine["aux_loss"]) == pytest.approx(expected_aux, rel=1e-5)
  log_z = torch.logsumexp(out.logits.float(), -1)
  w = batch["decoder_loss_weights"].float()
  expected_z = spec["losses"]["z_loss"] * float((log_z ** 2 * w).sum() / w.sum())
  assert float(with_z["z_loss"]) == pytest.approx(expected_z, rel=1e-5)


def test_reduced_run_writes_the_table(result):
  assert [r["model"] for r in result["runs"]] == ["switch_tiny", "t5_tiny"]
  for run in result["runs"]:
    assert run["steps"] == STEPS and len(run["train_loss"]) == STEPS
    assert all(math.isfinite(x) for x in run["train_loss"])
    # Untrained on a 2100-piece vocabulary: near ln 2100 = 7.65 at the first step.
    assert 6.5 < run["train_cross_ent_loss"][0] < 10.0
    assert set(run["eval"]) == {TASK} and run["eval"][TASK]["tokens"] > 0
  aux = {r["model"]: r["train_aux_loss"] for r in result["runs"]}
  assert all(a > 0 for a in aux["switch_tiny"]) and aux["t5_tiny"] == [0.0] * STEPS
  assert [row["model"] for row in result["table"]] == ["switch_tiny", "t5_tiny"]
  assert result["models"]["switch_tiny"]["expert_capacity"]["encoder_train"] == 5
  assert result["settings"]["optimizer"] == "adamw"


def test_same_seed_same_run(tc, exported):
  meta, parts = tc.load_batches(exported)
  args = argparse.Namespace(
      optimizer="adafactor", learning_rate=0.01, schedule="rsqrt", warmup_steps=2, steps=2,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  spec = tc.hf_model_spec("t5_tiny", meta["vocab_size"])
  runs = [tc.train_one(spec, 3, meta, parts, args) for _ in range(2)]
  assert runs[0]["train_loss"] == runs[1]["train_loss"]
  assert runs[0]["eval"] == runs[1]["eval"]
  # Evals during training (eval capacity, no grad) leave the training itself unchanged.
  switch = tc.hf_model_spec("switch_tiny", meta["vocab_size"])
  plain = tc.train_one(switch, 3, meta, parts, args)
  evaluated = tc.train_one(switch, 3, meta, parts, argparse.Namespace(**vars(args), eval_period=1))
  assert evaluated["train_loss"] == plain["train_loss"] and evaluated["eval"] == plain["eval"]
  assert [c["step"] for c in evaluated["eval_curve"]] == [1, 2]
  assert evaluated["eval_curve"][-1]["eval_loss"] == plain["eval_loss"]
  assert evaluated["eval_curve"][0]["eval_loss"] != plain["eval_loss"]


def test_export_takes_the_data_bindings_of_the_run(tc, tmp_path):
  # A binding the task's data needs (here a 1,000-piece vocabulary instead of the default 2,000)
  # reaches the export, as --gin does a training run's; in its own process (gin is global).
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "batches")
  subprocess.run([sys.executable, os.path.join(REPO, "scripts", "torch_control.py"), "export",
                  "--task", TASK, "--out", out, "--steps", "1", "--batch_size", "2",
                  "--inputs_length", "32", "--targets_length", "8", "--eval_steps", "1",
                  "--gin_binding", "get_vocabulary.vocab_size=1000"], check=True,
                 env=dict(os.environ, MOE_JAX_CACHE_DIR=str(tmp_path / "cache")))
  meta, parts = tc.load_batches(out)
  assert meta["vocab_size"] == 1100 and meta["gin_bindings"] == ["get_vocabulary.vocab_size=1000"]
  assert parts["train"]["decoder_target_tokens"].max() < 1100


def test_models_without_an_hf_form_are_refused(tc):
  with pytest.raises(ValueError, match="top-k routing with k != 1"):
    tc.hf_model_spec("gshard_tiny", 2100)
