"""The expert inspector on a hand-built switch_tiny checkpoint whose routing is known (token id
parity -> expert 0 or 1), on a task and on a mixture (columns: its tasks), its domain labels and
mutual information, and its one-line errors."""
import collections
import itertools
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from moe_jax import config
from moe_jax import corpora
from moe_jax import data
from moe_jax import evaluation
from moe_jax import inspect as inspect_lib
from moe_jax import train
from moe_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 32, "targets": 8}
# 4 experts with room for every token (C = S at eval): nothing is dropped.
MODEL_BINDINGS = ["NUM_EXPERTS=4", "EVAL_CAPACITY_FACTOR=4.0"]
ROUTER_SCALE = 0.5  # router logits [c·a, -c·a, 0, 0], a = the normalized embedding's first dim
BATCHES = 3


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


def _parity_params(model):
  """switch_tiny params where every MoE layer's router input is the normalized token embedding,
  whose first dimension is +3 for even ids and -3 for odd ids, and each router sends a positive
  first dimension to expert 0 and a negative one to expert 1."""
  shapes = trainer.batch_shapes(LENGTHS, 8, False)
  params = flax.core.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  flat = {k: np.array(v) for k, v in
          flax.traverse_util.flatten_dict(params["params"]).items()}
  for key in flat:
    if key[-1] == "out" or (key[-2:] == ("mlp", "wo") and key[1] == "layers_0"):
      flat[key][:] = 0  # attention and the dense MLP add nothing: x = embedding
    if key[-1] == "embedding":
      flat[key][:, 0] = np.where(np.arange(flat[key].shape[0]) % 2 == 0, 3.0, -3.0)
    if key[-2:] == ("router", "w"):
      flat[key][:] = 0
      flat[key][0, 0], flat[key][0, 1] = ROUTER_SCALE, -ROUTER_SCALE
  return flax.traverse_util.unflatten_dict(flat), flat[("token_embedder", "embedding")]


@pytest.fixture(scope="module")
def parity_checkpoint(tmp_path_factory):
  model = config.build_model(["gin/models/switch_tiny.gin"], MODEL_BINDINGS)
  params, embedding = _parity_params(model)
  path = tmp_path_factory.mktemp("parity") / "checkpoint_0" / "params"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  return str(path.parent), embedding


def _expected(tokens, embedding):
  """Per expert: token counts and mean router confidence, in NumPy from the routing rule."""
  x = embedding[tokens].astype(np.float64)
  a = x[:, 0] / np.sqrt(np.mean(x * x, axis=-1) + 1e-6)
  logits = np.stack([ROUTER_SCALE * a, -ROUTER_SCALE * a, 0 * a, 0 * a], -1)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = []
  for e, parity in ((0, 0), (1, 1)):
    mine = tokens % 2 == parity
    out.append((collections.Counter(tokens[mine].tolist()), probs[mine].max(-1).mean()))
  return out


def test_report_says_tokens_go_by_parity(parity_checkpoint, tmp_path):
  checkpoint, embedding = parity_checkpoint
  report = train.run(inspect_lib.inspect_checkpoint, [
      "--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/inspect.gin",
      *[f"--gin.{b}" for b in MODEL_BINDINGS], f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
      "--gin.BATCH_SIZE=8", f"--gin.EVAL_STEPS={BATCHES}", "--gin.TOP_TOKENS=5",
      f'--gin.CHECKPOINT_PATH="{checkpoint}"', f'--gin.INSPECT_OUTPUT_DIR="{tmp_path}"'],
      "moe_jax.inspect")
  batches = list(itertools.islice(data.get_dataset(
      data.DEFAULT_TASK, LENGTHS, "validation", 8, shuffle=False, pack=False, num_epochs=1),
      BATCHES))
  enc = np.concatenate([b["encoder_input_tokens"][b["encoder_input_tokens"] > 0]
                        for b in batches])
  dec = np.concatenate([b["decoder_input_tokens"][b["decoder_target_tokens"] > 0]
                        for b in batches])
  with open(tmp_path / "report.json") as f:
    assert json.load(f)["layers"] == report["layers"]
  md = (tmp_path / "report.md").read_text()
  assert (tmp_path / "heatmap.png").stat().st_size > 0
  assert sorted(report["layers"]) == ["decoder/layers_1/mlp", "encoder/layers_1/mlp"]
  for name, tokens in (("encoder/layers_1/mlp", enc), ("decoder/layers_1/mlp", dec)):
    layer = report["layers"][name]
    assert layer["tokens"] == len(tokens) and layer["fraction_dropped"] == 0.0
    assert layer["column_kind"] == "token class"  # every token has one
    assert np.sum(layer["column_counts"]) == len(tokens) and layer["labelled_fraction"] == 1.0
    for e, (counts, confidence) in enumerate(_expected(tokens, embedding)):
      expert = layer["experts"][e]
      top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
      assert [(t["id"], t["count"]) for t in expert["top_tokens"]] == top
      assert all(t["id"] % 2 == e for t in expert["top_tokens"])
      assert expert["tokens"] == sum(counts.values())
      assert expert["load"] == pytest.approx(sum(counts.values()) / len(tokens))
      assert expert["drop_rate"] == 0.0
      assert expert["confidence"] == pytest.approx(confidence, rel=1e-5)
      section = md.split(f"## {name}\n")[1].split("## ")[0]
      row = next(line for line in section.splitlines() if line.startswith(f"| {e} | "))
      assert row.split(" | ")[1].startswith(f"{expert['tokens']} (")
      assert f"`{expert['top_tokens'][0]['piece']}` {top[0][1]}" in row
    for e in (2, 3):  # nothing goes to the other experts
      assert layer["experts"][e]["tokens"] == 0 and layer["experts"][e]["load"] == 0.0
      assert layer["experts"][e]["top_tokens"] == []


MIXTURE = "inspect_test_mixture"
MIXTURE_TASKS = ("multidomain_prefix_lm", "pydocs_prefix_lm")  # synthetic words vs Python docs


@pytest.fixture
def mixture():
  seqio.MixtureRegistry.add(MIXTURE, [(task, 1.0) for task in MIXTURE_TASKS])
  yield MIXTURE
  seqio.MixtureRegistry.remove(MIXTURE)


def test_mixture_columns_are_its_tasks(parity_checkpoint, mixture, tmp_path):
  checkpoint, _ = parity_checkpoint
  report = train.run(inspect_lib.inspect_checkpoint, [
      "--gin_file=gin/models/switch_tiny.gin", "--gin_file=gin/runs/inspect.gin",
      *[f"--gin.{b}" for b in MODEL_BINDINGS], f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
      "--gin.BATCH_SIZE=8", f"--gin.EVAL_STEPS={BATCHES}",
      f'--gin.MIXTURE_OR_TASK_NAME="{mixture}"',
      f'--gin.CHECKPOINT_PATH="{checkpoint}"', f'--gin.INSPECT_OUTPUT_DIR="{tmp_path}"'],
      "moe_jax.inspect")
  assert report["tasks"] == {task: BATCHES for task in MIXTURE_TASKS}
  # Each task's non-padding tokens, per layer: the router sends even ids to expert 0, odd to 1.
  tokens = {"encoder/layers_1/mlp": [], "decoder/layers_1/mlp": []}
  for task in MIXTURE_TASKS:
    batches = list(itertools.islice(data.get_dataset(
        task, LENGTHS, "validation", 8, shuffle=False, pack=False, num_epochs=1), BATCHES))
    tokens["encoder/layers_1/mlp"].append(np.concatenate(
        [b["encoder_input_tokens"][b["encoder_input_tokens"] > 0] for b in batches]))
    tokens["decoder/layers_1/mlp"].append(np.concatenate(
        [b["decoder_input_tokens"][b["decoder_target_tokens"] > 0] for b in batches]))
  md = (tmp_path / "report.md").read_text()
  assert (tmp_path / "heatmap.png").stat().st_size > 0
  for name, per_task in tokens.items():
    layer = report["layers"][name]
    assert layer["column_kind"] == "task" and layer["columns"] == ["multidomain", "pydocs"]
    assert layer["labelled_fraction"] == 1.0
    joint = np.zeros((4, len(per_task)), np.int64)  # [expert, task]
    for t, ids in enumerate(per_task):
      for i in ids:
        joint[i % 2, t] += 1
    assert np.array_equal(layer["column_counts"], joint)
    assert np.sum(layer["column_counts"], axis=0).tolist() == [len(ids) for ids in per_task]
    n = joint.sum()
    mi = sum(joint[e, t] / n * np.log(joint[e, t] * n / (joint[e].sum() * joint[:, t].sum()))
             for e in range(4) for t in range(len(per_task)) if joint[e, t])
    h = -sum(c / n * np.log(c / n) for c in joint.sum(0))
    assert mi > 0
    assert layer["mutual_information_nats"] == pytest.approx(mi, rel=1e-9)
    assert layer["mutual_information_bits"] == pytest.approx(mi / np.log(2), rel=1e-9)
    assert layer["column_entropy_nats"] == pytest.approx(h, rel=1e-9)
    assert f"**{mi:.4f} nats ({mi / np.log(2):.4f} bits)** of H(task) = {h:.4f} nats" in md


def test_short_task_names():
  assert evaluation.short_task_names(
      ["manpages_de_prefix_lm", "manpages_pt_BR_prefix_lm", "manpages_pl_prefix_lm"]) == (
          "de", "pt_BR", "pl")
  assert evaluation.short_task_names(["a_x", "a_x_y"]) == ("a_x", "a_x_y")  # "" -> unchanged
  assert evaluation.short_task_names(["c4_en_span", "pydocs_span"]) == ("c4_en", "pydocs")


def test_domain_labels_follow_the_corpus_chains():
  spec = corpora.MultiDomainSpec(data.multidomain_words(), num_domains=8)
  vocab = data.get_vocabulary()
  size = vocab.vocab_size
  columns = inspect_lib.domain_columns(spec, vocab, size)
  right = wrong = unknown = 0
  for i in range(40):
    text, domain = corpora.multidomain_document(spec, "validation", i)
    ids = np.array([vocab.encode(text)])
    labels = columns.label(ids, 0)[0]
    assert labels[0] == -1  # no previous token
    right += int((labels == domain).sum())
    wrong += int(((labels >= 0) & (labels != domain)).sum())
    unknown += int((labels < 0).sum())
  # Only the document's own chain holds its bigrams; a few are held by several domains.
  assert wrong == 0 and right > 0.8 * (right + unknown)


def test_token_classes_from_pieces():
  pieces = ["<pad/start>", "</s>", "<extra_id_3>", "\u2581the", "ing", "\u258142", "\u2581.",
            "):", "\u2581", "\u2581__init__"]
  expected = ["start/pad", "EOS", "sentinel", "word start", "word piece", "number",
              "punctuation", "punctuation", "other", "word start"]
  assert [inspect_lib.TOKEN_CLASSES[c] for c in inspect_lib.token_classes(pieces)] == expected


def test_mutual_information_of_known_tables():
  assert inspect_lib.mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(np.log(2))
  assert inspect_lib.mutual_information(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0)
  joint = np.array([[3, 1], [1, 3]])
  p = joint / joint.sum()
  expected = sum(p[i, j] * np.log(p[i, j] / (p[i].sum() * p[:, j].sum()))
                 for i in range(2) for j in range(2))
  assert inspect_lib.mutual_information(joint) == pytest.approx(expected)


def test_bad_inspector_input_is_one_line(parity_checkpoint, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  base = [sys.executable, "-m", "moe_jax.inspect", "--gin_file=gin/runs/inspect.gin"]
  cases = [
      (["--gin_file=gin/models/switch_tiny.gin", f'--gin.CHECKPOINT_PATH="{tmp_path}/none"'],
       "moe_jax.inspect: error: CHECKPOINT_PATH: no readable checkpoint"),
      (["--gin_file=gin/models/t5_tiny.gin", f'--gin.CHECKPOINT_PATH="{parity_checkpoint[0]}"'],
       "moe_jax.inspect: error: MODEL: the model has no MoE layer"),
      (["--gin_file=gin/models/switch_tiny.gin", "--gin.TOP_TOKENS=0",
        f'--gin.CHECKPOINT_PATH="{parity_checkpoint[0]}"'],
       "moe_jax.inspect: error: TOP_TOKENS: must be an integer >= 1, got 0"),
  ]
  for flags, message in cases:
    out = subprocess.run(base[:3] + flags + base[3:], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(message), lines[-3:]
    assert sum("moe_jax.inspect" in line for line in lines) == 1
    assert "Traceback" not in out.stderr and out.stdout == ""
