"""Real multi-process JAX on one machine: a launcher and worker tasks.

`launch(command, ...)` runs `num_processes` copies of a command (any Python entry point that
calls `partitioning.initialize_multihost()` first, e.g. this file or `python -m moe_jax.train`)
to the end; `start` returns them running, to be signalled. Each has its own simulated CPU
devices; they are wired together through $MOE_JAX_COORDINATOR, $MOE_JAX_NUM_PROCESSES and
$MOE_JAX_PROCESS_ID on 127.0.0.1 and gloo collectives.

Worker tasks: `python tests/multihost_worker.py moe_sgd --steps 3` prints one JSON line
{"process": i, "losses": [...]}; `moe_sgd_losses` runs the same training in the calling process.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from typing import Callable, Sequence

WORKER = os.path.abspath(__file__)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """Cooperating JAX processes started by `start`; their output goes to temporary files."""

  def __init__(self, command: Sequence[str], procs: list[subprocess.Popen], logs: list):
    self.command = list(command)
    self.procs = procs
    self._logs = logs

  def send_signal(self, signum: int) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signum)

  def running(self) -> bool:
    return all(p.poll() is None for p in self.procs)

  def _collect(self, timeout: float, stop_on_failure: bool) -> list[tuple[str, str]]:
    """Waits until all exit, or one fails (stop_on_failure) or the timeout passes, killing the
    rest then; returns each one's (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      failed = ((stop_on_failure and any(p.poll() not in (None, 0) for p in self.procs))
                or time.monotonic() > deadline)
      if failed:  # alone, the others would wait for their peers until the coordinator gives up
        for p in self.procs:
          if p.poll() is None:
            p.kill()
            p.wait()
      time.sleep(0.2)
    texts = []
    for out, err in self._logs:
      out.seek(0)
      err.seek(0)
      texts.append((out.read(), err.read()))
      out.close()
      err.close()
    return texts

  def finish(self, timeout: float) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of each once all exit by themselves (those still running
    after `timeout` seconds are killed)."""
    texts = self._collect(timeout, stop_on_failure=False)
    return [(p.returncode, out, err) for p, (out, err) in zip(self.procs, texts)]

  def wait(self, timeout: float) -> list[str]:
    """Their stdouts once all exit. Raises RuntimeError with every process's stderr tail if one
    fails or the timeout passes (the others are then stopped)."""
    texts = self._collect(timeout, stop_on_failure=True)
    failed = any(p.returncode != 0 for p in self.procs)
    if failed:
      report = "\n".join(f"--- process {i} rc={p.returncode}\n{err[-3000:]}"
                         for i, (p, (_, err)) in enumerate(zip(self.procs, texts)))
      raise RuntimeError(f"multi-process run of {self.command} failed:\n{report}")
    return [out for out, _ in texts]


def start(command: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 4,
          env: dict[str, str] | None = None, cwd: str | None = None,
          preexec_fn: Callable[[], None] | None = None) -> Processes:
  """Start `command` as `num_processes` cooperating JAX processes (each runs preexec_fn first,
  as in subprocess.Popen)."""
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    child = dict(os.environ, **(env or {}))
    child.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
        "MOE_JAX_COORDINATOR": f"127.0.0.1:{port}",
        "MOE_JAX_NUM_PROCESSES": str(num_processes),
        "MOE_JAX_PROCESS_ID": str(i),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    })
    # Files, not pipes: a process blocked on a full pipe would stall its peers' collectives.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    logs.append((out, err))
    procs.append(subprocess.Popen(list(command), env=child, cwd=cwd, text=True,
                                  stdout=out, stderr=err, preexec_fn=preexec_fn))
  return Processes(command, procs, logs)


def launch(command: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 4,
           timeout: float = 300, env: dict[str, str] | None = None,
           cwd: str | None = None) -> list[str]:
  """Run `command` as `num_processes` cooperating JAX processes; returns their stdouts (see
  Processes.wait)."""
  return start(command, num_processes=num_processes, devices_per_process=devices_per_process,
               env=env, cwd=cwd).wait(timeout)


def moe_sgd_losses(steps: int = 3, mesh_shape: tuple[int, int, int] = (2, 4, 1)) -> list[float]:
  """A few SGD steps of a top-2 MoE layer on a regression target; each process feeds only its
  own rows of the global batch. Returns the per-step losses (identical on every process)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moe_jax import moe_layer, partitioning, routing

  part = partitioning.Partitioner(mesh_shape=mesh_shape)
  experts, batch, length, d_model = 8, 8, 4, 12
  layer = moe_layer.MoeLayer(
      num_experts=experts, d_ff=16,
      router=routing.TokensChooseRouter(experts, num_selected_experts=2, normalize_gates=True),
      num_groups=8, group_size=None, num_expert_partitions=part.num_expert_partitions,
      train_capacity_factor=1.0, min_expert_capacity=1, dispatch="einsum")

  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, length, d_model)).astype(np.float32)
  target = rng.normal(size=(batch, length, d_model)).astype(np.float32)
  rows = batch // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  data = part.shard_batch({"x": x[mine], "target": target[mine]})

  # Same random params on every process, each building only its own shards.
  abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, deterministic=True))
  shardings = part.params_shardings(abstract)["params"]
  host = jax.tree.map(lambda a: rng.normal(scale=0.3, size=a.shape).astype(np.float32),
                      nn.unbox(abstract["params"]))
  params = jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda i: h[i]),
                        host, shardings)

  def loss_fn(p, d):
    y, state = layer.apply({"params": p}, d["x"], deterministic=False, mutable=["moe"])
    losses, _ = moe_layer.summarize(state["moe"])
    return jnp.mean((y - d["target"]) ** 2) + 0.01 * losses["load_balance_loss"]

  def step(p, d):
    loss, grads = jax.value_and_grad(loss_fn)(p, d)
    return jax.tree.map(lambda w, g: w - 0.5 * g, p, grads), loss

  replicated = jax.sharding.NamedSharding(part.mesh, jax.sharding.PartitionSpec())
  train_step = part.jit(step, in_shardings=(shardings, part.data_sharding(3)),
                        out_shardings=(shardings, replicated))
  out = []
  for _ in range(steps):
    params, loss = train_step(params, data)
    out.append(float(loss))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("task", choices=["moe_sgd"])
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)

  from moe_jax import partitioning
  partitioning.initialize_multihost()
  import jax

  losses = moe_sgd_losses(args.steps)
  print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                    "losses": losses}))


if __name__ == "__main__":
  main()
