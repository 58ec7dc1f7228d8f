"""The model description saved with every checkpoint: built from the model object, structure
only. Expected values are read off the gin files by hand."""
import os

import gin
import pytest

from moe_jax import config
from moe_jax.checkpoints import model_description

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)


def _describe(gin_file, *bindings):
  model = config.build_model([gin_file], bindings)
  gin.clear_config()
  return model_description.describe(model)


def test_switch_tiny_as_its_gin_files_say():
  # switch_tiny.gin: t5_tiny dimensions, the docs task's 2100-id vocabulary, 8 top-1 experts
  # in the second layer of each 2-layer stack (switch_base.gin: sparse step 2, relu, tied
  # embeddings, 32 relative-attention buckets).
  moe = {"num_experts": 8, "expert_mlp_dim": 256, "expert_activations": ["relu"],
         "router": "TokensChooseRouter", "router_top_k": 1}
  assert _describe("gin/models/switch_tiny.gin") == {
      "format": 1, "model": "EncoderDecoderModel", "vocab_size": 2100, "d_model": 128,
      "num_heads": 4, "head_dim": 32, "mlp_dim": 256, "activations": ["relu"],
      "logits_via_embedding": True, "shared_input_embedding": True,
      "relative_attention_num_buckets": 32,
      "encoder": {"layers": ["dense", "moe"], "moe": moe},
      "decoder": {"layers": ["dense", "moe"], "moe": moe}}


def test_differences_name_the_structure_only():
  switch = _describe("gin/models/switch_tiny.gin")
  assert model_description.differences(switch, _describe("gin/models/gshard_tiny.gin")) == [
      "decoder.moe.router_top_k 1 vs 2", "encoder.moe.router_top_k 1 vs 2"]
  # Capacity, dropout and jitter change between pretraining, finetuning and eval on purpose.
  assert model_description.differences(switch, _describe(
      "gin/models/switch_tiny.gin", "TRAIN_CAPACITY_FACTOR = 2.0", "DROPOUT_RATE = 0.1",
      "ROUTER_JITTER_NOISE = 0.01")) == []
  dense = _describe("gin/models/t5_tiny.gin")
  assert dense["encoder"] == {"layers": ["dense", "dense"], "moe": None}
  assert "encoder.moe {...} vs None" in model_description.differences(switch, dense)
