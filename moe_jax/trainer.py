"""Train state and the compiled train / eval steps of a model on a Partitioner's mesh (t5x's
trainer.py): fresh, restored, fine-tuning and sparse-upcycling starts, microbatching and the
non-finite guard. The run around it is moe_jax/loop.py (`train`, what gin/runs/*.gin
configure), its restores moe_jax/restore.py, its eval moe_jax/evaluation.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import optimizers
from moe_jax import partitioning
from moe_jax.checkpoints import orbax_utils

Array = jax.Array
PyTree = Any


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
  optimizer: param_axes -> update direction for learning rate 1 (optimizers.adafactor,
    optimizers.adamw, or a function returning any optax chain); only needed for train_step.
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
               optimizer: optimizers.OptimizerFactory | None = None, *,
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
