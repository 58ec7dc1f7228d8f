"""Learning-rate schedules and optimizer factories (gin: `@optimizers.adafactor`,
`@optimizers.rsqrt_schedule()`); the Adafactor math is moe_jax/adafactor.py.

An optimizer factory takes the params' logical axis names and returns the update direction for
a learning rate of 1; the train step (trainer.Trainer) multiplies it by `learning_rate_fn(step)`,
evaluated in Python on the host and passed in. So the schedule follows the global step even when
the optimizer state starts fresh (finetuning, sparse upcycling), the logged learning rate is the
one applied, a new schedule does not change the compiled step, and computing it never waits for
the device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import gin
import optax

from moe_jax import adafactor as adafactor_lib
from moe_jax import validation

PyTree = Any
# Logical axis names of the params (PartitionSpecs) -> the update direction for learning rate 1.
OptimizerFactory = Callable[[PyTree], optax.GradientTransformation]
# Evaluated on the host (plain Python), so computing it never waits for the device.
Schedule = Callable[[int], float]


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
