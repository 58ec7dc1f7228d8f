"""t5x checkpoints both ways, against t5x and flaxformer themselves (unmodified).

1. flaxformer's own tokens-choose MoE model (flaxformer's tokens_choose_tiny.gin, t5x's
   contrib/moe pretrain.gin) trained 3 steps by `python -m t5x.train` (one subprocess shared by
   the module): moe_jax reads its Orbax checkpoint, maps flaxformer's names, derives the gin,
   and gives flaxformer's logits and t5x's losses on the same batch.
2. The older tensorstore format: written by t5x's legacy Checkpointer, read by moe_jax (the
   same arrays, optimizer state included); written by moe_jax, read by t5x's loader.
3. A checkpoint trained by moe_jax's trainer (flaxformer-compatible Switch config), written
   in t5x's format (both) with flaxformer names, restored by t5x's own restore (as its eval
   does) into flaxformer's Switch model: moe_jax's logits and loss.
1 and 3 convert through scripts/convert_t5x.py.

Tolerances: float32 rounding only. The frameworks sum in other orders (flaxformer embeds by a
one-hot matmul, joins heads and head_dim in its kernels, scales tied logits after the head): the
logits (|logit| <= 9) differ by at most 2.4e-6 (a few ulps; about half are bit-identical), the
losses by 1e-7 relative; they are checked at 8e-6 absolute + 1e-6 relative, and 1e-6 relative.
flaxformer zeroes the logits at padding targets, so moe_jax's are compared there as zeros.

t5x, airio, jestimator and flaxformer come from MOE_JAX_T5X_PATH (os.pathsep-separated dirs,
as .ci/run sets it); without it these tests are skipped.
"""
import importlib.util
import os
import re
import subprocess
import sys

import flax
import gin
import jax
import numpy as np
import pytest

from moe_jax import config
from moe_jax import data
from moe_jax.checkpoints import orbax_utils
from moe_jax.checkpoints import t5x_checkpoints as t5x_ckpt

T5X_PATH = [p for p in os.environ.get("MOE_JAX_T5X_PATH", "").split(os.pathsep) if p]
T5X_DIR = next((p for p in T5X_PATH if os.path.isdir(os.path.join(p, "t5x"))), None)
FLAXFORMER_DIR = next((p for p in T5X_PATH if os.path.isdir(os.path.join(p, "flaxformer"))),
                      None)
if T5X_DIR is None or FLAXFORMER_DIR is None:
  pytest.skip("t5x checkpoint tests need MOE_JAX_T5X_PATH = os.pathsep-separated dirs holding "
              "the t5x, airio, jestimator and flaxformer packages", allow_module_level=True)
for _path in reversed(T5X_PATH):
  if _path not in sys.path:
    sys.path.insert(0, _path)
from flaxformer.components.attention import dense_attention  # noqa: E402
from t5x import checkpoints as t5x_checkpoints  # noqa: E402
from t5x import partitioning as t5x_partitioning  # noqa: E402
from t5x import utils as t5x_utils  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, GROUP = 4, 32  # experts; flaxformer's max_group_size: 4 groups of 32 encoder tokens
LENGTHS = {"inputs": 16, "targets": 8}
BATCH = 8
STEPS = 3
TASK = "pydocs_span_corruption"

# flaxformer's tokens-choose MoE (top-2, gated gelu, untied logits, MoE in layer 1 of each
# stack) trained by t5x; only sizes and the float32 dtypes differ from the shipped gin. t5x's CPU
# mesh puts every device on 'model': partitioned dims are multiples of the 8 test devices
# (heads, vocabulary rows; the task's vocabulary has 2100 ids).
TOKENS_CHOOSE = f"""
from __gin__ import dynamic_registration
from moe_jax import data

include 'flaxformer/t5x/configs/moe/models/tokens_choose_tiny.gin'

VOCABULARY = @data.get_vocabulary()
NUM_EMBEDDINGS = 2176
NUM_HEADS = 8
HEAD_DIM = 16
NUM_EXPERTS = {E}
GROUP_SIZE = {GROUP}
ACTIVATION_DTYPE = 'float32'
MOE_TRUNCATED_DTYPE = 'float32'
"""
# flaxformer's Switch (top-1, relu, tied logits), small.
SWITCH = f"""
from __gin__ import dynamic_registration
from moe_jax import data

include 'flaxformer/t5x/configs/moe/models/switch_base.gin'

VOCABULARY = @data.get_vocabulary()
NUM_EMBEDDINGS = 2176
NUM_ENCODER_LAYERS = 2
NUM_DECODER_LAYERS = 2
NUM_ENCODER_SPARSE_LAYERS = 1
NUM_DECODER_SPARSE_LAYERS = 1
NUM_HEADS = 8
HEAD_DIM = 8
EMBED_DIM = 32
MLP_DIM = 64
NUM_EXPERTS = {E}
GROUP_SIZE = {GROUP}
ACTIVATION_DTYPE = 'float32'
MOE_TRUNCATED_DTYPE = 'float32'
"""
# The same Switch in moe_jax (trained by moe_jax's trainer in test 3).
MOE_JAX_SWITCH = f"""
from __gin__ import dynamic_registration
from moe_jax import data

include 'models/switch_base.gin'
include 'semantics/flaxformer_model.gin'

VOCAB_SIZE = 2176
EMBED_DIM = 32
NUM_HEADS = 8
HEAD_DIM = 8
MLP_DIM = 64
NUM_ENCODER_LAYERS = 2
NUM_DECODER_LAYERS = 2
NUM_EXPERTS = {E}
GROUP_SIZE = {GROUP}
DROPOUT_RATE = 0.0
ROUTER_JITTER_NOISE = 0.0
ACTIVATION_DTYPE = 'float32'
"""
RUN = f"""
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils

include 'model.gin'
include 't5x/contrib/moe/configs/runs/pretrain.gin'

NUM_EXPERT_PARTITIONS = 1
NUM_MODEL_PARTITIONS = 1
MIXTURE_OR_TASK_NAME = '{TASK}'
MIXTURE_OR_TASK_MODULE = 'moe_jax.data'
TASK_FEATURE_LENGTHS = {LENGTHS!r}
TRAIN_STEPS = {STEPS}
BATCH_SIZE = {BATCH}
USE_CACHED_TASKS = False
train_script.train.train_eval_dataset_cfg = None
utils.SaveCheckpointConfig.period = {STEPS}
utils.create_learning_rate_scheduler.warmup_steps = 1
"""


def _one_device_env() -> dict[str, str]:
  """The environment for a training subprocess: one CPU device (faster than conftest's 8),
  t5x and moe_jax importable."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = os.pathsep.join([REPO] + T5X_PATH + [env.get("PYTHONPATH", "")])
  return env


def _run(cmd: list[str], cwd: str) -> None:
  proc = subprocess.run(cmd, cwd=cwd, env=_one_device_env(), capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def t5x_run(tmp_path_factory):
  """flaxformer's tokens-choose model trained STEPS steps by `python -m t5x.train`."""
  root = tmp_path_factory.mktemp("t5x_run")
  (root / "model.gin").write_text(TOKENS_CHOOSE)
  (root / "run.gin").write_text(RUN)
  model_dir = root / "model"
  _run([sys.executable, "-m", "t5x.train",
        f"--gin_search_paths={root},{FLAXFORMER_DIR},{T5X_DIR}", f"--gin_file={root}/run.gin",
        f"--gin.MODEL_DIR='{model_dir}'"], cwd=str(root))
  return str(model_dir)


@pytest.fixture(scope="module")
def batch():
  """A packed validation batch of the task t5x trained on (t5x's feature converter)."""
  it = data.get_dataset(TASK, LENGTHS, "validation", BATCH, shuffle=False)
  return {k: np.asarray(v) for k, v in next(iter(it)).items()}


def _flaxformer_model(model_gin: str):
  """t5x's MoeEncoderDecoderModel over flaxformer's module, from flaxformer's gins. The MoE
  layers get one expert replica on this process's devices (groups a multiple of E, as in the
  one-device training run). The gin config stays parsed: flaxformer builds submodules from it
  when applied; callers clear it."""
  gin.clear_config()
  for path in (FLAXFORMER_DIR, T5X_DIR):
    gin.add_config_file_search_path(path)
  gin.parse_config(model_gin)
  gin.parse_config([f"NUM_EXPERT_PARTITIONS = {E}",
                    f"NUM_MODEL_PARTITIONS = {jax.device_count() // E}"])
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def _t5x_restore(model, step_dir: str, with_optimizer: bool = False):
  """t5x's own restore, as t5x's eval does it (Orbax checkpoint manager; it hands legacy
  checkpoints to its legacy Checkpointer)."""
  shapes = {"encoder_input_tokens": (BATCH, LENGTHS["inputs"]),
            "decoder_input_tokens": (BATCH, LENGTHS["targets"])}
  partitioner = t5x_partitioning.PjitPartitioner(num_partitions=1)
  initializer = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def if with_optimizer else None,
      init_fn=model.get_initial_variables, input_shapes=shapes, partitioner=partitioner)
  cfg = t5x_utils.RestoreCheckpointConfig(path=step_dir, mode="specific")
  state, _ = t5x_utils.create_checkpoint_manager_and_restore(
      initializer, partitioner, cfg, step_dir, None, use_orbax=True)
  return state, partitioner


def _write(path, text: str) -> str:
  path.write_text(text)
  return str(path)


def _flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in t5x_ckpt.flatten(tree).items()}


def _assert_same_arrays(got, want):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _real(batch) -> np.ndarray:
  """[b,l,1] 1 at real target positions (flaxformer zeroes the logits elsewhere)."""
  return (batch["decoder_target_tokens"] > 0)[..., None]


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "convert_t5x", os.path.join(REPO, "scripts", "convert_t5x.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _restore_moe_jax(gin_file: str, path: str):
  """(model, params) of a moe_jax checkpoint path, restored by moe_jax's orbax_utils."""
  model = config.build_model([gin_file])
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  params, _ = orbax_utils.restore_params_from_path(path, flax.core.meta.unbox(abstract["params"]))
  gin.clear_config()
  return model, jax.tree.map(np.asarray, params)


def test_t5x_trained_flaxformer_model_runs_in_moe_jax(t5x_run, batch, tmp_path):
  """Orbax checkpoint of t5x's run -> moe_jax: flaxformer's logits and t5x's losses."""
  ckpt = t5x_ckpt.read_t5x_checkpoint(t5x_run, with_optimizer=True)
  assert (ckpt["step"], ckpt["format"]) == (STEPS, "orbax")
  ff_model = _flaxformer_model(TOKENS_CHOOSE)
  state, _ = _t5x_restore(ff_model, os.path.join(t5x_run, f"checkpoint_{STEPS}"))
  ff_params = jax.tree.map(np.asarray, state.params)
  _assert_same_arrays(ckpt["target"], ff_params)
  assert ckpt["param_states"] is not None  # t5x's Adafactor state came along
  # flaxformer's decoder marks real positions from its input tokens, moe_jax from the
  # targets: on t5x's packed batches they agree (this batch has padding, which both route).
  ff_mask = np.asarray(dense_attention.get_decoder_logit_mask(batch["decoder_input_tokens"],
                                                              np.float32))
  np.testing.assert_array_equal(ff_mask, _real(batch))
  assert not _real(batch).all()
  ff_logits = np.asarray(ff_model._compute_logits(ff_params, batch, None))  # noqa: SLF001
  _, ff_metrics = ff_model.loss_fn(ff_params, batch, None)
  ff = {k: float(ff_metrics[k].compute()) for k in
        ("loss", "cross_ent_loss", "z_loss", "experts/auxiliary_loss",
         "experts/fraction_tokens_left_behind")}
  gin.clear_config()

  out = tmp_path / "converted"
  # The shapes give everything but the run's group size (the preset has the gin's 4096).
  _load_script().main(["to_moe_jax", f"--t5x_path={t5x_run}", "--preset=tokens_choose",
                       f"--out={out}", f"--binding=GROUP_SIZE = {GROUP}"])
  model, params = _restore_moe_jax(str(out / "model.gin"), str(out))
  _assert_same_arrays(params, t5x_ckpt.to_moe_jax(ckpt["target"]))
  logits = np.asarray(model.logits(params, batch))
  _, metrics = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(logits * _real(batch), ff_logits, rtol=1e-6, atol=8e-6)
  # t5x reports the aux loss already scaled; the cross-entropy and z-loss per real token.
  assert float(metrics["loss"]) == pytest.approx(ff["loss"], rel=1e-6)
  assert float(metrics["cross_ent_loss"]) == pytest.approx(ff["cross_ent_loss"], rel=1e-6)
  assert float(metrics["z_loss"]) == pytest.approx(ff["z_loss"], rel=1e-6)
  assert float(metrics["aux_loss"]) == pytest.approx(ff["experts/auxiliary_loss"], rel=1e-6)
  dropped = np.mean([float(v) for k, v in metrics.items() if k.endswith("fraction_dropped")])
  # The capacity binds (tokens are dropped), so routing order and padding matter here.
  assert ff["experts/fraction_tokens_left_behind"] > 0
  assert dropped == pytest.approx(ff["experts/fraction_tokens_left_behind"], abs=1e-6)


def test_tensorstore_format_both_ways(t5x_run, tmp_path):
  """t5x's legacy Checkpointer -> moe_jax's reader, and moe_jax's writer -> t5x's loader."""
  ff_model = _flaxformer_model(TOKENS_CHOOSE)
  state, partitioner = _t5x_restore(ff_model, os.path.join(t5x_run, f"checkpoint_{STEPS}"),
                                    with_optimizer=True)
  legacy_dir = tmp_path / "legacy"
  t5x_checkpoints.Checkpointer(state, partitioner, str(legacy_dir)).save(state)
  gin.clear_config()
  want = jax.tree.map(np.asarray, state.state_dict())
  ckpt = t5x_ckpt.read_t5x_checkpoint(str(legacy_dir), with_optimizer=True)
  assert (ckpt["step"], ckpt["format"]) == (STEPS, "tensorstore")
  assert os.path.isfile(legacy_dir / f"checkpoint_{STEPS}" / "checkpoint")
  _assert_same_arrays(ckpt["target"], want["target"])
  _assert_same_arrays(ckpt["param_states"], want["state"]["param_states"])

  # moe_jax writes the legacy format (moe_jax names); t5x's own loader reads it back.
  params = t5x_ckpt.to_moe_jax(ckpt["target"])
  step_dir = t5x_ckpt.write_t5x_checkpoint(str(tmp_path / "ours"), params, 7, "tensorstore")
  loaded = t5x_checkpoints.load_t5x_checkpoint(step_dir)
  assert int(loaded["state"]["step"]) == 7
  _assert_same_arrays(loaded["target"], params)
  # ...and moe_jax's reader with the identity mapping.
  _assert_same_arrays(t5x_ckpt.to_moe_jax(t5x_ckpt.read_t5x_checkpoint(step_dir)["target"]),
                      params)


@pytest.mark.parametrize("fmt", t5x_ckpt.FORMATS)
def test_moe_jax_trained_switch_restored_by_t5x(tmp_path_factory, batch, fmt, moe_jax_run):
  """moe_jax-trained Switch -> t5x checkpoint (flaxformer names) -> t5x restore into
  flaxformer's Switch: moe_jax's logits; and back through moe_jax's reader."""
  model_dir, model, params = moe_jax_run
  logits = np.asarray(model.logits(params, batch))
  _, metrics = model.loss_fn(params, batch, None)
  out = tmp_path_factory.mktemp(f"to_t5x_{fmt}")
  _load_script().main(["to_t5x", f"--moe_jax_path={model_dir}", f"--out={out}",
                       f"--format={fmt}"])
  step_dir = str(out / "checkpoint_2")

  ff_model = _flaxformer_model(SWITCH)
  state, _ = _t5x_restore(ff_model, step_dir)
  assert int(state.step) == 2
  ff_params = jax.tree.map(np.asarray, state.params)
  ff_logits = np.asarray(ff_model._compute_logits(ff_params, batch, None))  # noqa: SLF001
  _, ff_metrics = ff_model.loss_fn(ff_params, batch, None)
  ff_loss = float(ff_metrics["loss"].compute())
  gin.clear_config()
  np.testing.assert_allclose(logits * _real(batch), ff_logits, rtol=1e-6, atol=8e-6)
  assert float(metrics["loss"]) == pytest.approx(ff_loss, rel=1e-6)

  # Reading it back: the same params, and the derived gin rebuilds the trained model.
  read_params, gin_text, step = t5x_ckpt.load_t5x(step_dir, preset="switch")
  assert step == 2
  _assert_same_arrays(read_params, params)
  rebuilt = config.build_model([_write(out / "model.gin", gin_text)],
                               [f"GROUP_SIZE = {GROUP}"])
  np.testing.assert_array_equal(np.asarray(rebuilt.logits(read_params, batch)), logits)


@pytest.fixture(scope="module")
def moe_jax_run(tmp_path_factory):
  """The Switch trained 2 steps by moe_jax's trainer (subprocess) -> (model dir, model,
  params)."""
  root = tmp_path_factory.mktemp("moe_jax_run")
  gin_file = _write(root / "switch.gin", MOE_JAX_SWITCH)
  model_dir = root / "model"
  _run([sys.executable, "-m", "moe_jax.train", f"--gin_file={gin_file}",
        "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.TRAIN_STEPS=2", f"--gin.BATCH_SIZE={BATCH}",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}", "--gin.EVAL_PERIOD=0",
        "--gin.CHECKPOINT_PERIOD=2", "--gin.WARMUP_STEPS=1"], cwd=REPO)
  assert orbax_utils.latest_steps(str(model_dir)) == [2]
  return (str(model_dir),) + _restore_moe_jax(gin_file, str(model_dir))


def test_names_and_placements_moe_jax_cannot_hold_are_refused():
  """One error names every such parameter (never a silent skip); a sparse placement moe_jax
  cannot express (flaxformer's MIXED layout, 1 MoE layer in 4) is refused by name."""
  z = np.zeros
  flaxformer = {"token_embedder": {"embedding": z((8, 4))}, "encoder": {
      "relpos_bias": {"rel_embedding": z((2, 32))},
      "layers_0": {"relpos_bias": {"rel_embedding": z((2, 32))},
                   "mlp": {"router": {"router_weights": {"w": {"kernel": z((4, 2)),
                                                               "bias": z((2,))}}}}}}}
  with pytest.raises(ValueError, match=r"^2 flaxformer parameter\(s\) have no moe_jax "
                     r"equivalent: encoder/layers_0/mlp/router/router_weights/w/bias, "
                     r"encoder/layers_0/relpos_bias/rel_embedding$"):
    t5x_ckpt.flaxformer_to_moe_jax(flaxformer)
  with pytest.raises(ValueError, match=r"^1 moe_jax parameter\(s\) have no flaxformer "
                     r"equivalent: encoder/layers_0/extra$"):
    t5x_ckpt.moe_jax_to_flaxformer({"encoder": {"layers_0": {"extra": z((1,))}}})

  layers = {f"layers_{i}": {"attention": {"query": z((4, 2, 2))}, "mlp": {"wi": z((4, 8))}}
            for i in range(4)}
  layers["layers_3"]["mlp"] = {"router": {"w": z((4, 2))}, "wi": z((2, 4, 8))}
  params = {"token_embedder": {"embedding": z((8, 4))},
            "encoder": {"relpos_bias": {"rel_embedding": z((2, 32))}, **layers}}
  with pytest.raises(ValueError, match=r"encoder: MoE layers \[3\] of 4 follow no moe_jax "
                     "placement"):
    t5x_ckpt.flaxformer_to_gin(params, "switch")
  with pytest.raises(ValueError, match="preset 'tokens_choose' has activations"):
    t5x_ckpt.flaxformer_to_gin(params, "tokens_choose")

  with pytest.raises(ValueError, match=r"3 problem\(s\)\): missing c \(1,\); unexpected b; "
                     r"a: shape \(2,\) != model's \(3,\)$"):
    t5x_ckpt.check_params({"a": z((2,)), "b": z((1,))}, {"a": z((3,)), "c": z((1,))})
