"""Train state, train / eval steps, checkpointing and the training loop (t5x conventions).

`train(...)` is what gin/runs/*.gin configure and `python -m moe_jax.train` runs:

  data.get_dataset (this process's shard) -> Partitioner.shard_batch -> train_step (jit with
  explicit shardings) -> metrics (TensorBoard via clu, MODEL_DIR/metrics.jsonl, tqdm)
  -> orbax checkpoints every CHECKPOINT_PERIOD steps, the last step and on SIGTERM.

Reliability pieces live in their own modules: validation (every setting, before compiling),
checkpoints/policy (restore the newest good checkpoint, confirm saves, rotate), model_dir (the
run lock, room to write), metrics_writer (TensorBoard, metrics.jsonl); the non-finite guard is
part of the train step (Trainer).

The optimizer factories (`adafactor`, `adamw`) take the params' logical axis names and return
the update direction for a learning rate of 1; the train step multiplies it by
`learning_rate_fn(step)`, evaluated in Python on the host and passed in. So the schedule
follows the global step even when the optimizer state starts fresh (finetuning, sparse
upcycling), the logged learning rate is the one applied, a new schedule does not change the
compiled step, and computing it never waits for the device.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import adafactor as adafactor_lib
from moe_jax import metrics_writer
from moe_jax import model_dir as model_dir_lib
from moe_jax import partitioning
from moe_jax import validation
from moe_jax.checkpoints import model_description
from moe_jax.checkpoints import orbax_utils
from moe_jax.checkpoints import policy

Array = jax.Array
PyTree = Any
# Logical axis names of the params (PartitionSpecs) -> the update direction for learning rate 1.
OptimizerFactory = Callable[[PyTree], optax.GradientTransformation]
# Evaluated on the host (plain Python), so computing it never waits for the device.
Schedule = Callable[[int], float]

# ---- learning-rate schedules and optimizers -------------------------------------------------


@gin.configurable
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                   linear_warmup: bool = False, start_step: int = 0) -> Schedule:
  """T5's schedule: base · 1/sqrt(max(start_step + step, warmup_steps)).

  Constant base/sqrt(warmup) for the first warmup_steps, then inverse square-root decay (T5 and
  Switch: base 1.0, warmup 10k). linear_warmup additionally ramps it from 0 over the warmup.
  start_step > 0 continues a source model's schedule in a run that restarts at step 0 (an
  upcycled or distilled model: the source checkpoint's step, as Komatsuzaki et al. 2022 do).
  """
  validation.number("LEARNING_RATE", base_learning_rate, minimum=0.0)
  validation.integer("WARMUP_STEPS", warmup_steps, minimum=1)
  validation.integer("LEARNING_RATE_START_STEP", start_step, minimum=0)
  def schedule(step: int) -> float:
    step += start_step
    lr = base_learning_rate / math.sqrt(max(step, warmup_steps))
    if linear_warmup:
      lr *= min(1.0, (step + 1) / warmup_steps)
    return lr
  return schedule


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
  """A constant learning rate (t5x finetuning uses 1e-3 with Adafactor)."""
  validation.number("LEARNING_RATE", learning_rate, minimum=0.0)
  return lambda step: learning_rate


@gin.configurable
def adafactor(param_axes: PyTree, decay_rate: float = 0.8, factored: bool = True,
              multiply_by_parameter_scale: bool = True, clipping_threshold: float | None = 1.0,
              min_dim_size_to_factor: int = 128, momentum: float | None = None,
              weight_decay_rate: float | None = None, epsilon: float = 1e-30,
              factor_rules: Mapping[str, str] | None = None) -> optax.GradientTransformation:
  """Adafactor with the T5 defaults (decay_rate 0.8, updates clipped to RMS 1.0 and scaled by
  the parameter's RMS, at least 1e-3, no momentum), factored by t5x's logical factor rules: see
  moe_jax/adafactor.py (each expert of a stacked weight has its own statistics).

  param_axes: logical axis names of the params (the Trainer passes them). With momentum or
  weight_decay_rate set, those terms are scaled by the learning rate as well (optax.adafactor).
  """
  tx = [adafactor_lib.scale_by_adafactor(
      param_axes, rules=adafactor_lib.FACTOR_RULES if factor_rules is None else factor_rules,
      decay_rate=decay_rate, factored=factored, min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon=epsilon, clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale)]
  if momentum is not None:
    tx.append(optax.ema(momentum, debias=False))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate))
  return optax.chain(*tx, optax.scale(-1.0))


@gin.configurable
def adamw(param_axes: PyTree, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, scaled by the learning rate like optax.adamw)."""
  del param_axes  # the same rule for every param
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.add_decayed_weights(weight_decay), optax.scale(-1.0))


# ---- data ---------------------------------------------------------------------------------


def data_module():
  """moe_jax.data, imported on first use: it starts TensorFlow (through seqio), which takes
  seconds and prints to stderr, so command-line and gin errors are reported before that.

  Its gin configurables may then register after the config was finalized: no binding can name
  them unless a gin file imported the module (dynamic registration) while it was parsed.
  """
  with gin.unlock_config():
    from moe_jax import data
  return data


# ---- train state and steps ------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a restart needs besides the data position."""
  step: Array        # int32 []
  params: PyTree
  opt_state: PyTree
  rng: Array         # uint32 [2]: the run's base key; step s uses fold_in(rng, s)
  # int32 []: consecutive steps with a non-finite loss, gradient or update (not checkpointed).
  nonfinite_streak: Array


def batch_shapes(task_feature_lengths: Mapping[str, int], batch_size: int,
                 pack: bool) -> dict[str, tuple[int, int]]:
  """Model-feature shapes of a global batch (t5x feature names)."""
  le, ld = task_feature_lengths["inputs"], task_feature_lengths["targets"]
  shapes = {"encoder_input_tokens": (batch_size, le), "decoder_input_tokens": (batch_size, ld),
            "decoder_target_tokens": (batch_size, ld), "decoder_loss_weights": (batch_size, ld)}
  if pack:
    shapes.update(encoder_segment_ids=(batch_size, le), decoder_segment_ids=(batch_size, ld),
                  encoder_positions=(batch_size, le), decoder_positions=(batch_size, ld))
  return shapes


# Terms of models.EncoderDecoderModel's loss normalized by the batch's target tokens; the
# rest of the loss (MoE aux and router z-losses) is a mean over MoE groups.
_TOKEN_NORMALIZED_LOSSES = ("cross_ent_loss", "z_loss")
_TOKEN_NORMALIZED_METRICS = ("cross_ent_loss", "z_loss", "accuracy", "target_cross_ent_loss",
                             "teacher_cross_ent_loss")


class Trainer:
  """Compiled train / eval steps of a model on a Partitioner's mesh.

  model: models.EncoderDecoderModel (loss_fn, eval_fn, predict_batch, get_initial_variables).
  input_shapes: global batch shapes of the model features (see batch_shapes).
  optimizer: param_axes -> update direction for learning rate 1 (adafactor, adamw, or a
    function returning any optax chain); only needed for train_step.
  num_microbatches: the global batch is split into this many slices whose gradients are
    accumulated (token-weighted, see `_microbatch_grads`) before one optimizer update.
  max_nonfinite_skips: the non-finite guard, on device: a step whose loss, gradient norm or
    updated params are not finite leaves params and optimizer state as they were. Once more
    than max_nonfinite_skips such steps came in a row (0: the first), every later update is
    skipped too (the state stays the last finite one) until the host sees `nonfinite_streak`
    in the metrics and stops the run.
  frozen_params: arrays the loss reads but does not train, already sharded (a distillation
    teacher's params, moe_jax/distill.py); each train step takes them as an argument (never
    baked into the compiled step) and calls model.loss_fn(params, batch, rng, frozen_params).
  """

  def __init__(self, model: Any, partitioner: partitioning.Partitioner,
               input_shapes: Mapping[str, tuple[int, ...]],
               optimizer: OptimizerFactory | None = None, *,
               num_microbatches: int = 1,
               grad_clip_norm: float | None = None, max_nonfinite_skips: int = 0,
               frozen_params: PyTree | None = None):
    self.model, self.partitioner = model, partitioner
    self.frozen_params = frozen_params
    self.num_microbatches = int(num_microbatches)
    self.max_nonfinite_skips = max_nonfinite_skips
    batch_size = next(iter(input_shapes.values()))[0]
    if self.num_microbatches < 1 or batch_size % self.num_microbatches:
      raise ValueError(f"num_microbatches={num_microbatches} must divide the batch size "
                       f"{batch_size}")
    self.input_shapes = dict(input_shapes)
    boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, self.input_shapes),
                           jax.random.PRNGKey(0))
    # Eval and inference build a Trainer without an optimizer (no train_step then).
    self.param_axes = nn.get_partition_spec(boxed)["params"]  # logical names, PartitionSpecs
    tx = optimizer(self.param_axes) if optimizer else optax.identity()
    self.optimizer = (optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
                      if grad_clip_norm else tx)
    self.params_shardings = partitioner.params_shardings(boxed)["params"]
    self.abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed)["params"], self.params_shardings)
    self.opt_shardings = partitioner.opt_state_shardings(
        self.optimizer, self.abstract_params, self.params_shardings)
    replicated = NamedSharding(partitioner.mesh, P())
    self.replicated = replicated
    self.state_shardings = TrainState(step=replicated, params=self.params_shardings,
                                      opt_state=self.opt_shardings, rng=replicated,
                                      nonfinite_streak=replicated)
    self._train_step = None
    self._eval_step = None
    self._compiled_init: dict[Any, jax.stages.Compiled] = {}

  # -- state ------------------------------------------------------------------------------------

  def compile_init(self, *, params: PyTree | None = None, dense: PyTree | None = None,
                   dense_opt_state: PyTree | None = None) -> jax.stages.Compiled:
    """The compiled start of a run: (rng, step[, params or dense]) -> TrainState (its params
    None when given: they are the caller's).

    Every leaf of the state is an output with its sharding (out_shardings), so XLA creates it
    directly there: no device ever holds a whole expert weight. Its `.memory_analysis()` is the
    step's per-device peak on top of the arrays already on the devices (given params are not
    counted as arguments: the optimizer init reads their shapes alone). Compiled once per kind
    of input, so inspecting it before a run costs no second compile. Arguments are trees of
    arrays or ShapeDtypeStructs with shardings; with neither, fresh params:
      params: given params (restored for fine-tuning), fresh optimizer state.
      dense: a dense model's params (orbax_utils.restore_for_upcycle): sparse upcycling; the
        fresh init supplies only the leaves they lack (routers), XLA drops the rest.
      dense_opt_state: with dense, the dense run's optimizer state as stored
        (orbax_utils.restore_opt_state_for_upcycle), carried over (upcycle_opt_state).
    """
    if params is not None and dense is not None:
      raise ValueError("compile_init takes params or dense params, not both")
    if dense_opt_state is not None and dense is None:
      raise ValueError("compile_init takes dense_opt_state only with dense params")
    trees = (params, dense, dense_opt_state)
    signature = (params is not None, jax.tree.structure(trees),
                 tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(trees)))
    if signature not in self._compiled_init:
      self._compiled_init[signature] = self._compile_init(*trees)
    return self._compiled_init[signature]

  def _compile_init(self, params: PyTree | None, dense: PyTree | None,
                    dense_opt_state: PyTree | None) -> jax.stages.Compiled:
    sources = None if dense is None else orbax_utils.upcycle_sources(dense, self.abstract_params)

    def init(rng, step, *given):
      if params is not None:  # they stay where they are: as an output they would be copied
        return TrainState(step=step, params=None, opt_state=self.optimizer.init(given[0]),
                          rng=rng, nonfinite_streak=jnp.zeros((), jnp.int32))
      new_params = nn.unbox(self.model.get_initial_variables(rng, self.input_shapes))["params"]
      if dense is not None:
        new_params = orbax_utils.upcycle_params(given[0], new_params, sources)
      opt_state = self.optimizer.init(new_params)
      if dense_opt_state is not None:
        opt_state = orbax_utils.upcycle_opt_state(given[1], opt_state, new_params,
                                                  self.param_axes, sources)
      return TrainState(step=step, params=new_params, opt_state=opt_state,
                        rng=rng, nonfinite_streak=jnp.zeros((), jnp.int32))
    given = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          tree) for tree in (params, dense, dense_opt_state) if tree is not None]
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    out_shardings = self.state_shardings
    if params is not None:
      out_shardings = out_shardings.replace(params=None)
    in_shardings = (self.replicated, self.replicated,
                    *[jax.tree.map(lambda x: x.sharding, tree) for tree in given])
    lowered = self.partitioner.jit(init, in_shardings=in_shardings,
                                   out_shardings=out_shardings).lower(rng, step, *given)
    # Initialization runs once: on CPU, XLA's backend optimizations cost several times the
    # compile time (seconds to minutes) and save nothing.
    options = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None)
    return lowered.compile(compiler_options=options)

  def _start(self, seed: int, step: int, *given: PyTree, **compile_args: PyTree) -> TrainState:
    rng = jax.device_put(jax.random.PRNGKey(seed), self.replicated)
    step = jax.device_put(jnp.asarray(step, jnp.int32), self.replicated)
    return self.compile_init(**compile_args)(rng, step, *given)

  def init_state(self, seed: int) -> TrainState:
    """Fresh params (created directly in their shardings), optimizer state, step 0."""
    return self._start(seed, 0)

  def state_from_params(self, params: PyTree, step: int, seed: int) -> TrainState:
    """A train state around given (sharded) params with a fresh optimizer state (finetune)."""
    return self._start(seed, step, params, params=params).replace(params=params)

  def upcycle_state(self, dense: PyTree, seed: int, dense_opt_state: PyTree | None = None
                    ) -> TrainState:
    """Sparse upcycling: step 0 from a dense model's params (orbax_utils.restore_for_upcycle)
    and fresh routers; the dense run's optimizer state carried over when given
    (orbax_utils.restore_opt_state_for_upcycle), else a fresh one. Every leaf is created in its
    sharding (compile_init)."""
    given = [tree for tree in (dense, dense_opt_state) if tree is not None]
    return self._start(seed, 0, *given, dense=dense, dense_opt_state=dense_opt_state)

  def state_from_items(self, params: PyTree, train_state: Mapping[str, Any]) -> TrainState:
    """A TrainState from params and the orbax 'train_state' item (step, rng, opt_state)."""
    replicate = lambda x, dtype: jax.device_put(jnp.asarray(x, dtype), self.replicated)  # noqa: E731
    return TrainState(step=replicate(train_state["step"], jnp.int32), params=params,
                      opt_state=train_state["opt_state"],
                      rng=replicate(train_state["rng"], jnp.uint32),
                      nonfinite_streak=replicate(0, jnp.int32))

  def checkpoint_bytes(self) -> int:
    """Bytes of one checkpoint (params and optimizer state at their dtypes, all shards)."""
    opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
    return sum(x.size * x.dtype.itemsize
               for x in jax.tree.leaves((self.abstract_params, opt)))

  def abstract_train_state(self) -> dict[str, Any]:
    """The orbax 'train_state' item (step, rng, opt_state) as ShapeDtypeStructs with shardings."""
    opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       opt, self.opt_shardings)
    return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated),
            "opt_state": opt}

  # -- steps ------------------------------------------------------------------------------------

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return {k: self.partitioner.data_sharding(np.ndim(v)) for k, v in batch.items()}

  def _microbatch_grads(self, params, batch, rng, frozen=None):
    """(grads, metrics) of the loss over `batch`, accumulated over microbatches.

    Microbatch i takes rows i, i+n, i+2n, ... so every device keeps its own rows. The model
    normalizes its cross-entropy and output z-loss by the batch's target tokens and averages
    the MoE losses over groups, so microbatch i's token-normalized terms are weighted by its
    share of the target tokens and the rest (aux and router z-losses) by 1/n. For a
    deterministic model whose MoE groups do not straddle microbatches this is the full-batch
    gradient up to float summation order.
    """
    n = self.num_microbatches
    loss_fn = (self.model.loss_fn if frozen is None else
               lambda p, b, r: self.model.loss_fn(p, b, r, frozen))
    if n == 1:
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
      return grads, metrics

    def objective(p, mb, mb_rng, share):
      loss, metrics = loss_fn(p, mb, mb_rng)
      per_token = sum(metrics[k] for k in _TOKEN_NORMALIZED_LOSSES)
      return share * per_token + (loss - per_token) / n, metrics
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def split(x):  # [b, ...] -> [n, b/n, ...], microbatch i = rows i::n
      x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)
    micro = jax.tree.map(split, batch)
    weights = micro["decoder_loss_weights"].astype(jnp.float32)
    tokens = jnp.sum(weights, axis=tuple(range(1, weights.ndim)))
    shares = tokens / jnp.maximum(jnp.sum(tokens), 1.0)

    def body(carry, xs):
      grads_acc, metrics_acc = carry
      i, mb, share = xs
      (objective_value, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), share)
      metrics = {k: (share if k in _TOKEN_NORMALIZED_METRICS else 1.0 / n) * v
                 for k, v in metrics.items()}
      metrics["loss"] = objective_value
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
      return (grads_acc, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: loss_fn(params, first, rng)[1])
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro, shares))
    metrics["num_tokens"] = jnp.sum(tokens)
    return grads, metrics

  def _train_step_impl(self, state: TrainState, batch, lr, frozen=None):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = self._microbatch_grads(state.params, batch, rng, frozen)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + (lr * u).astype(p.dtype), state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    # The non-finite guard (see the class docstring): no host sync, the host reads the streak
    # with the period's metrics.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    halted = state.nonfinite_streak > self.max_nonfinite_skips
    apply = finite & ~halted
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
    streak = jnp.where(halted, state.nonfinite_streak,
                       jnp.where(finite, 0, state.nonfinite_streak + 1))
    metrics = dict(metrics, learning_rate=lr, grad_norm=grad_norm,
                   nonfinite_skipped=(~apply).astype(jnp.float32), nonfinite_streak=streak)
    return state.replace(step=state.step + 1, params=keep_old(params, state.params),
                         opt_state=keep_old(opt_state, state.opt_state),
                         nonfinite_streak=streak), metrics

  def train_step(self, state: TrainState, batch: Mapping[str, Array], learning_rate: float
                 ) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update on a global batch (from Partitioner.shard_batch). `state` is
    donated: its buffers are reused for the result."""
    if self._train_step is None:
      frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen_params)
      self._train_step = self.partitioner.jit(
          self._train_step_impl,
          in_shardings=(self.state_shardings, self.batch_shardings(batch), self.replicated,
                        frozen_shardings),
          out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    return self._train_step(state, batch, np.float32(learning_rate), self.frozen_params)

  def eval_step(self, params: PyTree, batch: Mapping[str, Array]) -> dict[str, Array]:
    """Deterministic metrics (eval capacity factor) of a global batch."""
    if self._eval_step is None:
      self._eval_step = self.partitioner.jit(
          lambda p, b: self.model.eval_fn(p, b)[1],
          in_shardings=(self.params_shardings, self.batch_shardings(batch)),
          out_shardings=self.replicated)
    return self._eval_step(params, batch)


# ---- preemption -----------------------------------------------------------------------------


class _Preemption:
  """SIGTERM -> checkpoint at the current step and a clean exit.

  One process: a Python signal handler sets a flag the loop polls. Several processes: jax's
  preemption sync manager (started by jax.distributed) catches SIGTERM and all processes agree
  on the step to stop at.
  """

  def __init__(self):
    self.flag = False
    self.previous = None
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


# ---- the loop -------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainSummary:
  """What `train` returns (and the CLI prints)."""
  step: int
  model_dir: str
  checkpoint: str | None          # the last checkpoint directory written or restored
  tensorboard_dir: str
  metrics_file: str | None       # MODEL_DIR/metrics.jsonl (local model dirs)
  preempted: bool
  final_metrics: dict[str, Any]   # train metrics averaged over the last stats period
  eval_metrics: dict[str, Any]    # last eval ('<task>/loss', '<task>/accuracy', ...)
  history: list[dict[str, Any]]   # one entry per stats period: {'step': s, metrics...}
  restored_from: str | None
  seconds: float


def _local_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding input + target tokens of this process's rows."""
  return int(np.count_nonzero(batch["encoder_input_tokens"])
             + np.count_nonzero(batch["decoder_target_tokens"]))


def task_names(mixture_or_task_name: str) -> list[str]:
  """The tasks eval reports separately: a mixture's tasks, or the task itself."""
  data_module()  # registers the tasks
  import seqio  # after data_module, for the same reason
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = getattr(provider, "tasks", None)
  return [t.name for t in tasks] if tasks else [mixture_or_task_name]


def restore_for_inference(model: Any, partitioner: partitioning.Partitioner | None,
                          task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool,
                          checkpoint_path: str, mixture_or_task_name: str, split: str
                          ) -> tuple["Trainer", PyTree, str, int]:
  """(trainer, params, model_dir, step) for eval / infer from a checkpoint_<step> directory or a
  model dir, with the params restored directly into their shardings. Validates the settings,
  the task and the checkpoint against the model first (validation.SettingError)."""
  partitioner = partitioner or partitioning.Partitioner()
  validation.feature_lengths(task_feature_lengths)
  validation.batch(batch_size, partitioner)
  validation.model(model, partitioner)
  validation.vocabulary(model, data_module().check_task(mixture_or_task_name, [split]))
  trainer = Trainer(model, partitioner, batch_shapes(task_feature_lengths, batch_size, pack))
  model_dir, step = _check_checkpoint("CHECKPOINT_PATH", checkpoint_path, trainer)
  params, _ = orbax_utils.restore_params_from_path(checkpoint_path, trainer.abstract_params)
  return trainer, params, model_dir, step


def _check_checkpoint(setting: str, path: str, trainer: Trainer) -> tuple[str, int]:
  """(model dir, step) of an explicit checkpoint that belongs to the trainer's model."""
  try:
    model_dir, step = orbax_utils.resolve_path(path)
    model_description.check(setting, orbax_utils.step_dir(model_dir, step), trainer.model,
                            trainer.abstract_params)
  except validation.SettingError:
    raise
  except (FileNotFoundError, ValueError, OSError) as e:
    raise validation.SettingError(setting, f"no readable checkpoint at {path} "
                                           f"({str(e).splitlines()[0][:200]})") from None
  return model_dir, step


def eval_batches(task: str, *, task_feature_lengths: Mapping[str, int], batch_size: int,
                 split: str = "validation", eval_steps: int | None = 20, pack: bool = True,
                 seed: int = 0, num_shards: int | None = None,
                 train_stream_from: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches of one task for eval: the first eval_steps (None: one pass).

  Several processes repeat the data, so that each runs exactly eval_steps batches and none
  waits on a shard that ran out. num_shards: as in data.get_dataset (default process count).
  train_stream_from: k reads the training stream of `seed` (as `train` does) from its batch k
  instead of `split`: the batches a run trained on at steps k+1, k+2, ...
  """
  if eval_steps is None and jax.process_count() > 1:
    raise ValueError("eval_steps=None (a full pass) needs one process: shards of unequal length "
                     "would leave processes waiting on each other; set eval_steps")
  stream = train_stream_from is not None
  it = data_module().get_dataset(
      task, dict(task_feature_lengths), "train" if stream else split, batch_size,
      shuffle=stream, seed=seed, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=num_shards, pack=pack,
      num_epochs=1 if jax.process_count() == 1 and not stream else None)
  if stream:
    it.set_state(dict(it.get_state(), batches_consumed=train_stream_from))
  return itertools.islice(it, eval_steps)


def evaluate_tasks(trainer: Trainer, params: PyTree,
                   batches: Mapping[str, Iterable[Mapping[str, np.ndarray]]]) -> dict[str, float]:
  """Token-weighted loss and accuracy of each task's batches ({task: batches}).

  Returns {'<task>/loss': ..., '<task>/cross_ent_loss': ..., '<task>/accuracy': ...,
  '<task>/num_tokens': ...}.
  """
  out = {}
  for task, task_batches in batches.items():
    sums = {"loss": 0.0, "cross_ent_loss": 0.0, "accuracy": 0.0}
    total = 0.0
    # Dispatch every batch, then fetch all metrics at once: no wait for the device per batch.
    on_device = [trainer.eval_step(params, trainer.partitioner.shard_batch(local))
                 for local in task_batches]
    for metrics in jax.device_get(on_device):
      weight = float(metrics["num_tokens"])
      for key in sums:
        sums[key] += weight * float(metrics[key])
      total += weight
    for key, value in sums.items():
      out[f"{task}/{key}"] = value / max(total, 1e-9)
    out[f"{task}/num_tokens"] = total
  return out


def _restore_or_init(trainer: Trainer, it, *, model_dir: str, seed: int,
                     initial_checkpoint_path: str | None, initial_checkpoint_mode: str,
                     restore_dataset: bool) -> tuple[TrainState, str | None, bool]:
  """(state, where from, resumed): the newest good checkpoint in MODEL_DIR (resumed), else
  INITIAL_CHECKPOINT_PATH (by mode; its data position too if restore_dataset), else a fresh
  state."""
  def restore(reader, step):  # a checkpoint of another model stops the run (SettingError)
    model_description.check("MODEL_DIR", orbax_utils.step_dir(model_dir, step), trainer.model,
                            trainer.abstract_params)
    return orbax_utils.restore(reader, step, abstract_params=trainer.abstract_params,
                               abstract_train_state=trainer.abstract_train_state(),
                               with_data=True)
  found = policy.restore_newest(model_dir, restore)
  if found is not None:  # a restart: everything, data position included
    (params, train_state, data_state), step = found
    _set_data_state(it, data_state, "MODEL_DIR")
    return (trainer.state_from_items(params, train_state), orbax_utils.step_dir(model_dir, step),
            True)
  if not initial_checkpoint_path:
    return trainer.init_state(seed), None, False

  ckpt_dir, ckpt_step = orbax_utils.resolve_path(initial_checkpoint_path)
  source = orbax_utils.step_dir(ckpt_dir, ckpt_step)
  if restore_dataset:  # before the state: a position that does not fit stops the run sooner
    set_data_state_from(it, source, "INITIAL_CHECKPOINT_PATH", "RESTORE_DATASET")
  if initial_checkpoint_mode in ("upcycle", "upcycle_params"):
    dense, sources = orbax_utils.restore_for_upcycle(source, trainer.abstract_params)
    report = orbax_utils.upcycle_report(sources, trainer.abstract_params)
    dense_opt = None
    if initial_checkpoint_mode == "upcycle":  # into the shardings the dense params came in
      dense_opt = orbax_utils.restore_opt_state_for_upcycle(source, dense)
    logging.info("sparse upcycling from %s: %d copied, %d expert weights tiled, fresh: %s; "
                 "optimizer state %s", source, len(report["copied"]), len(report["tiled"]),
                 report["fresh"], "fresh" if dense_opt is None else "carried over")
    try:
      return trainer.upcycle_state(dense, seed, dense_opt), source, False
    except ValueError as e:  # upcycle_opt_state's, raised while tracing: nothing compiled yet
      if dense_opt is None:
        raise
      raise validation.SettingError(
          "OPTIMIZER", f"{e}; upcycle with the dense run's optimizer, or with "
          "INITIAL_CHECKPOINT_MODE='upcycle_params' (a fresh optimizer state)") from None

  reader = orbax_utils.read_only_manager(ckpt_dir)
  has_train_state = (epath.Path(source) / "train_state").is_dir()
  if initial_checkpoint_mode == "full" and has_train_state:
    params, train_state, _ = orbax_utils.restore(
        reader, ckpt_step, abstract_params=trainer.abstract_params,
        abstract_train_state=trainer.abstract_train_state())
    state = trainer.state_from_items(params, train_state)
  else:  # 'params', or 'full' from a checkpoint without optimizer state
    params, _, _ = orbax_utils.restore(reader, ckpt_step, abstract_params=trainer.abstract_params)
    state = trainer.state_from_params(params, ckpt_step, seed)
  reader.close()
  return state, source, False


def _set_data_state(it, data_state: Mapping[str, Any] | None, setting: str,
                    switch: str | None = None) -> None:
  """Continues `it` from a checkpoint's data position (none saved: from the start). switch:
  the setting that turns this off, named in the error."""
  if data_state:
    try:
      it.set_state(data_state)
    except ValueError as e:
      off = f"; {switch}=False reads the stream from its start" if switch else ""
      raise validation.SettingError(setting, f"its checkpoint's data position does not fit "
                                             f"this run: {e}{off}") from None


def set_data_state_from(it, path: str, setting: str, switch: str) -> None:
  """Continues `it` where the run of the checkpoint at `path` stopped reading (the batches after
  the ones it trained on), if it saved a position."""
  _set_data_state(it, orbax_utils.data_state_from_path(path), setting, switch)


def _nonfinite_error(rows: list[Mapping[str, Any]], first_step: int, max_skips: int,
                     last_checkpoint: str | None) -> validation.RunError | None:
  """The error to stop with when a step of `rows` (host metrics of steps first_step, ...)
  exceeded the non-finite guard, else None. Names the step and its MoE layers' metrics."""
  for i, row in enumerate(rows):
    if int(row["nonfinite_streak"]) > max_skips:
      layers = {}
      for key, value in row.items():
        if key.startswith("moe/") and np.ndim(value) == 0:
          layer, name = key[len("moe/"):].rsplit("/", 1)
          layers.setdefault(layer, []).append(f"{name} {float(value):.4g}")
      moe = "; ".join(f"{layer}: {', '.join(v)}" for layer, v in sorted(layers.items()))
      return validation.RunError(
          f"non-finite loss, gradient or update at step {first_step + i} (loss {float(row['loss']):.4g}, "
          f"grad_norm {float(row['grad_norm']):.4g}; {int(row['nonfinite_streak'])} in a row, "
          f"MAX_NONFINITE_SKIPS={max_skips}); MoE layers at that step: {moe or 'none'}; "
          f"stopped, last good checkpoint: {last_checkpoint or '(none)'}")
  return None


class _Period:
  """Device metrics of the steps since the last summary, fetched once per period, and the
  training throughput (the first step, i.e. compilation, evals and saves are not timed)."""

  def __init__(self, first_step: int):
    self.first_step = first_step  # the step before the period's first step
    self.pending: list[dict[str, Array]] = []
    self.host: list[dict[str, np.ndarray]] | None = None
    self.tokens, self.steps, self.paused = 0, 0, 0.0
    self.start: float | None = None

  def add(self, metrics: dict[str, Array], local_batch: Mapping[str, np.ndarray]) -> None:
    self.pending.append(metrics)
    metrics["nonfinite_streak"].copy_to_host_async()  # for previous_streak, a step later
    self.host = None
    if self.start is None:
      jax.block_until_ready(metrics)
      self.start = time.time()
    else:
      self.tokens += _local_tokens(local_batch) * jax.process_count()
      self.steps += 1

  def previous_streak(self) -> int:
    """The non-finite streak after the step before the newest one (0 when that step belongs to
    the previous period, which was checked as a whole). The newest step is already queued, so
    waiting for the one before never leaves the device idle."""
    return int(self.pending[-2]["nonfinite_streak"]) if len(self.pending) > 1 else 0

  def fetch(self) -> list[dict[str, np.ndarray]]:
    if self.host is None:
      self.host = jax.device_get(self.pending)  # one transfer per period (or save)
    return self.host

  def summarize(self, step: int) -> dict[str, Any]:
    """Averages of the period's steps (and throughput); starts the next period."""
    averaged = metrics_writer.average_metrics(self.fetch())
    elapsed = max(time.time() - self.start - self.paused, 1e-9)
    if self.steps:
      averaged["tokens_per_second"] = np.asarray(self.tokens / elapsed)
      averaged["steps_per_second"] = np.asarray(self.steps / elapsed)
    self.first_step, self.pending, self.host = step, [], None
    self.tokens, self.steps, self.paused, self.start = 0, 0, 0.0, time.time()
    return averaged


@gin.configurable
def train(*, model: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          optimizer: OptimizerFactory = adafactor,
          learning_rate_fn: Schedule | None = None,
          partitioner: partitioning.Partitioner | None = None,
          num_data_shards: int | None = None, num_microbatches: int = 1,
          grad_clip_norm: float | None = None, random_seed: int = 0, shuffle: bool = True,
          pack: bool = True, checkpoint_period: int = 1000, keep_checkpoints: int | None = None,
          checkpoint_params_dtype: str | None = None, checkpoint_save_timeout_s: int = 1200,
          initial_checkpoint_path: str | None = None, initial_checkpoint_mode: str = "full",
          restore_dataset: bool = False, stats_period: int = 10, eval_period: int = 0,
          eval_steps: int | None = 20, eval_split: str = "validation",
          max_nonfinite_skips: int = 0, use_tqdm: bool = True,
          write_jsonl: bool = True, distillation: Any | None = None) -> TrainSummary:
  """Trains `model` to step `total_steps`; resumes from MODEL_DIR's newest good checkpoint.

  Args (gin macros of gin/runs/*.gin in brackets):
    model: models.EncoderDecoderModel [MODEL].
    model_dir: checkpoints, TensorBoard logs (train/, training_eval/), metrics.jsonl and the
      run lock [MODEL_DIR].
    total_steps: the final global step, counting restored steps (t5x) [TRAIN_STEPS].
    mixture_or_task_name, task_feature_lengths: seqio task and {'inputs': le, 'targets': ld}.
    batch_size: global batch; each process reads batch_size / process_count rows [BATCH_SIZE].
    num_data_shards: shards of the data (default: the process count); each process reads
      num_data_shards / process_count of them. Fix it to keep the same global batches, and a
      resumable data position, across runs with different numbers of processes
      [NUM_DATA_SHARDS].
    optimizer: factory of the update direction (adafactor, adamw) [OPTIMIZER].
    learning_rate_fn: step -> learning rate (default rsqrt_schedule()).
    partitioner: partitioning.Partitioner (default: all devices on 'data').
    num_microbatches: gradient accumulation slices per step [NUM_MICROBATCHES].
    grad_clip_norm: clip gradients to this global norm (None: off, as in T5).
    checkpoint_period, keep_checkpoints: save every N steps (and at the end), keep the last K.
    checkpoint_params_dtype: e.g. 'bfloat16' to store params smaller (restored as float32).
    checkpoint_save_timeout_s: several processes: how long each background save waits for the
      other processes' writes (after a write failed on one, the others stop after this long).
    initial_checkpoint_path: used when MODEL_DIR has no checkpoint: a checkpoint_<step> dir or
      a model dir (latest step) [INITIAL_CHECKPOINT_PATH].
    initial_checkpoint_mode: 'full' (params, optimizer state, step, rng; params only when the
      checkpoint has no optimizer state), 'params' (params and step, fresh optimizer),
      'upcycle' (a dense checkpoint -> this MoE model at step 0 with the dense run's optimizer
      state, as the paper does; a fresh one when the checkpoint has none; see
      Trainer.upcycle_state) or 'upcycle_params' (the same with a fresh optimizer state)
      [INITIAL_CHECKPOINT_MODE in sparse_upcycle.gin].
    restore_dataset: also restore the data position from initial_checkpoint_path (any mode),
      so the run reads the batches after the ones that checkpoint was trained on
      [RESTORE_DATASET].
    stats_period: steps per summary (TensorBoard, metrics.jsonl, progress bar loss).
    eval_period, eval_steps, eval_split: eval every N steps (0: never) on the first
      eval_steps batches of each task of the mixture (read once, the same batches every time)
      [EVAL_PERIOD, EVAL_STEPS].
    max_nonfinite_skips: 0 stops the run at the first step with a non-finite loss or gradient
      (nothing of it is applied or saved); N > 0 skips such updates and stops after more than N
      in a row [MAX_NONFINITE_SKIPS]. The host reads each step's verdict once the next step
      is queued, so the run stops one step after the one that tripped the guard.
    distillation: a distill.Distillation (gin/runs/distill.gin): `model` is then the MoE
      teacher, and the run trains its dense student against the teacher's token probabilities,
      starting from the teacher's non-expert weights (unless MODEL_DIR or
      initial_checkpoint_path has a checkpoint) and, with its restore_dataset, from the
      teacher's data position (a restart resumes its own).
  Raises validation.SettingError for a bad setting (before anything is compiled) and
  validation.RunError when the run cannot go on (divergence, a failed save, a busy MODEL_DIR).
  """
  start_time = time.time()
  partitioner = partitioner or partitioning.Partitioner()
  learning_rate_fn = learning_rate_fn or rsqrt_schedule()
  validation.integer("TRAIN_STEPS", total_steps, minimum=0)
  validation.feature_lengths(task_feature_lengths)
  validation.batch(batch_size, partitioner, num_microbatches, num_data_shards)
  for setting, value, minimum in (("CHECKPOINT_PERIOD", checkpoint_period, 1),
                                  ("STATS_PERIOD", stats_period, 1),
                                  ("EVAL_PERIOD", eval_period, 0),
                                  ("RANDOM_SEED", random_seed, 0),
                                  ("MAX_NONFINITE_SKIPS", max_nonfinite_skips, 0)):
    validation.integer(setting, value, minimum=minimum)
  validation.integer("KEEP_CHECKPOINTS", keep_checkpoints, minimum=1, allow_none=True)
  validation.integer("checkpoint_save_timeout_s", checkpoint_save_timeout_s, minimum=1)
  validation.integer("EVAL_STEPS", eval_steps, minimum=1, allow_none=jax.process_count() == 1)
  validation.number("GRAD_CLIP_NORM", grad_clip_norm, positive=True, allow_none=True)
  validation.choice("initial_checkpoint_mode", initial_checkpoint_mode,
                    ("full", "params", "upcycle", "upcycle_params"))
  validation.choice("checkpoint_params_dtype", checkpoint_params_dtype,
                    (None, "float32", "bfloat16", "float16"))
  validation.schedule(learning_rate_fn, total_steps)
  validation.model(model, partitioner)
  task_vocab_size = data_module().check_task(
      mixture_or_task_name, ["train"] + ([eval_split] if eval_period else []))
  validation.vocabulary(model, task_vocab_size)
  shapes = batch_shapes(task_feature_lengths, batch_size, pack)
  teacher_params = None
  if distillation is not None:
    model, teacher_params = distillation.setup(model, partitioner, shapes)
  trainer = Trainer(model, partitioner, shapes, optimizer, num_microbatches=num_microbatches,
                    grad_clip_norm=grad_clip_norm, max_nonfinite_skips=max_nonfinite_skips,
                    frozen_params=teacher_params)
  if initial_checkpoint_path and not initial_checkpoint_mode.startswith("upcycle"):
    _check_checkpoint("INITIAL_CHECKPOINT_PATH", initial_checkpoint_path, trainer)

  model_dir = orbax_utils.absolute(model_dir)
  local = "://" not in model_dir
  lock = None
  if jax.process_index() == 0:
    try:
      epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise validation.SettingError("MODEL_DIR", f"cannot create {model_dir}: "
                                                 f"{e.strerror or e}") from None
    lock = model_dir_lib.run_lock(model_dir)
  preemption = _Preemption()  # before the restore, so that a SIGTERM during set-up counts
  try:
    if jax.process_index() == 0 and local:
      model_dir_lib.check_writable(model_dir, trainer.checkpoint_bytes())
    it = data_module().get_dataset(
        mixture_or_task_name, dict(task_feature_lengths), "train", batch_size, shuffle=shuffle,
        seed=random_seed, process_index=jax.process_index(), process_count=jax.process_count(),
        num_shards=num_data_shards, pack=pack)
    if distillation is not None:  # replaced below by a restart's own position
      distillation.continue_data(it)
    state, restored_from, resumed = _restore_or_init(
        trainer, it, model_dir=model_dir, seed=random_seed,
        initial_checkpoint_path=initial_checkpoint_path,
        initial_checkpoint_mode=initial_checkpoint_mode, restore_dataset=restore_dataset)
    if distillation is not None and restored_from is None:
      state = distillation.init_student(trainer, state, teacher_params, random_seed)
    step = int(jax.device_get(state.step))
    if resumed and jax.process_index() == 0:
      print(f"Resumed from {restored_from} (step {step})", flush=True)
    jsonl = os.path.join(model_dir, "metrics.jsonl") if write_jsonl and local else None
    if jsonl and jax.process_index() == 0:
      metrics_writer.drop_rows_after(jsonl, step)
    evaluate = _TrainingEval(trainer, task_names(mixture_or_task_name), task_feature_lengths=
                             task_feature_lengths, batch_size=batch_size, split=eval_split,
                             eval_steps=eval_steps, pack=pack, seed=random_seed,
                             num_shards=num_data_shards) if eval_period else None
    checkpoints = policy.CheckpointPolicy(
        model_dir, keep_checkpoints,
        jnp.dtype(checkpoint_params_dtype) if checkpoint_params_dtype else None,
        model_description.describe(model), checkpoint_save_timeout_s)
    summary = TrainSummary(
        step=step, model_dir=model_dir, checkpoint=restored_from if resumed else None,
        tensorboard_dir=model_dir, metrics_file=jsonl, preempted=False, final_metrics={},
        eval_metrics={}, history=[], restored_from=restored_from, seconds=0.0)
    loggers = {"train": metrics_writer.MetricsLogger(os.path.join(model_dir, "train"), jsonl),
               "eval": metrics_writer.MetricsLogger(os.path.join(model_dir, "training_eval"),
                                                    None)}
    try:
      _loop(trainer, state, it, summary, checkpoints, loggers, preemption, evaluate,
            total_steps=total_steps, learning_rate_fn=learning_rate_fn,
            checkpoint_period=checkpoint_period, stats_period=stats_period,
            eval_period=eval_period, use_tqdm=use_tqdm, resumed=resumed)
    finally:
      for logger in loggers.values():
        logger.close()
      checkpoints.close()
  finally:
    preemption.close()
    if lock:
      lock.release()
  summary.seconds = time.time() - start_time
  return summary


class _TrainingEval:
  """Eval during training: the first eval_steps batches of each task, read once and reused."""

  def __init__(self, trainer: Trainer, tasks: list[str], **batch_settings: Any):
    self.trainer, self.tasks, self.batch_settings = trainer, tasks, batch_settings
    self.data: dict[str, list[dict[str, np.ndarray]]] | None = None

  def __call__(self, params: PyTree) -> dict[str, float]:
    if self.data is None:
      self.data = {task: list(eval_batches(task, **self.batch_settings)) for task in self.tasks}
    return evaluate_tasks(self.trainer, params, self.data)


def _loop(trainer: Trainer, state: TrainState, it, summary: TrainSummary,
          checkpoints: policy.CheckpointPolicy, loggers: dict[str, Any], preemption: _Preemption,
          evaluate: _TrainingEval | None, *, total_steps: int, learning_rate_fn: Schedule,
          checkpoint_period: int, stats_period: int, eval_period: int, use_tqdm: bool,
          resumed: bool) -> None:
  """The training loop from summary.step to total_steps; fills in `summary`."""
  step, period = summary.step, _Period(summary.step)
  max_skips = trainer.max_nonfinite_skips

  def check_finite() -> None:  # before every summary and save: a checkpoint is always finite
    # (and a step after a step that the guard stopped on, see _Period.previous_streak)
    error = _nonfinite_error(period.fetch(), period.first_step + 1, max_skips, summary.checkpoint)
    if error:
      raise error

  def save() -> None:
    check_finite()
    summary.checkpoint = checkpoints.save(
        step, params=state.params, train_state={"step": state.step, "rng": state.rng,
                                                "opt_state": state.opt_state},
        data_state=it.get_state())

  if step >= total_steps:
    logging.warning("step %d already reaches TRAIN_STEPS=%d (TRAIN_STEPS counts restored "
                    "steps, as in t5x): nothing to train", step, total_steps)
    if not resumed:  # keep what was built, e.g. an upcycled model with TRAIN_STEPS=0
      save()
    return
  progress = _progress_bar(step, total_steps) if use_tqdm and jax.process_index() == 0 else None
  try:
    while step < total_steps:
      local = next(it)
      state, metrics = trainer.train_step(state, trainer.partitioner.shard_batch(local),
                                          learning_rate_fn(step))
      step += 1
      period.add(metrics, local)
      if period.previous_streak() > max_skips:  # the guard stopped updates a step ago
        check_finite()
      checkpoints.poll()  # a failed background save stops the run now
      if progress:
        progress.update(1)
      last = step >= total_steps
      if step % stats_period == 0 or last:
        check_finite()
        checkpoints.check()  # several processes: a failed save stops all of them here
        summary.final_metrics = averaged = period.summarize(step)
        summary.history.append(dict(step=step, **averaged))
        loggers["train"].write(step, averaged, split="train")
        if progress:
          postfix = {"loss": f"{float(averaged['loss']):.3f}"}
          if "tokens_per_second" in averaged:
            postfix["tok/s"] = f"{float(averaged['tokens_per_second']):.0f}"
          progress.set_postfix(postfix)
      pause_start = time.time()
      if evaluate and (step % eval_period == 0 or last):
        summary.eval_metrics = evaluate(state.params)
        loggers["eval"].write(step, summary.eval_metrics)
        loggers["train"].write(step, {f"eval/{k}": v for k, v in summary.eval_metrics.items()},
                               split="eval")
      summary.preempted = preemption.reached(step)
      if last or summary.preempted or step % checkpoint_period == 0:
        save()
      period.paused += time.time() - pause_start
      if summary.preempted:
        break
  finally:
    if progress:
      progress.close()
  summary.step = step


def _progress_bar(step: int, total_steps: int):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
              smoothing=0.1)


def format_summary(summary: TrainSummary) -> str:
  """The end-of-run report the CLI prints."""
  m = summary.final_metrics
  lines = [f"{'Preempted' if summary.preempted else 'Finished'} at step {summary.step} "
           f"in {summary.seconds:.0f}s."]
  if m:
    parts = [f"loss {float(m['loss']):.4f}"]
    for key in ("accuracy", "aux_loss", "z_loss", "router_z_loss", "target_cross_ent_loss",
                "teacher_cross_ent_loss"):
      if key in m:
        parts.append(f"{key} {float(m[key]):.4f}")
    if "tokens_per_second" in m:
      parts.append(f"{float(m['tokens_per_second']):.0f} tokens/s")
    lines.append("Final train metrics: " + ", ".join(parts))
    moe = metrics_writer.moe_summary(m)
    if "mean_fraction_dropped" in moe:
      lines.append(f"Tokens dropped (mean over MoE layers): {moe['mean_fraction_dropped']:.2%}; "
                   f"router confidence {moe.get('mean_router_confidence', float('nan')):.3f}")
    for layer, load in moe["expert_load"].items():
      lines.append(f"  expert load {layer}: " + " ".join(f"{x:.2f}" for x in load))
  for key, value in summary.eval_metrics.items():
    if not key.endswith("num_tokens"):
      lines.append(f"Eval {key}: {value:.4f}")
  lines.append(f"Checkpoint: {summary.checkpoint or '(none written)'}")
  lines.append(f"TensorBoard: tensorboard --logdir {summary.tensorboard_dir}")
  if summary.metrics_file:
    lines.append(f"Metrics (JSON lines): {summary.metrics_file}")
  return "\n".join(lines)
