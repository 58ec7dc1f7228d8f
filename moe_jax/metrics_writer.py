"""Training metrics: averaged per summary period, MoE per-layer summaries, and their writers
(TensorBoard through clu and MODEL_DIR/metrics.jsonl). Only process 0 writes."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

import moe_jax

# Summed over a period rather than averaged.
_SUMMED = ("num_tokens", "nonfinite_skipped")


def average_metrics(history: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Mean over steps; num_tokens and nonfinite_skipped are summed."""
  out = {}
  for key in history[0]:
    values = np.stack([np.asarray(h[key], np.float64) for h in history])
    out[key] = values.sum(0) if key in _SUMMED else values.mean(0)
  return out


def moe_summary(metrics: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Per-layer MoE metrics ('moe/<layer>/<name>') -> means over layers and expert loads."""
  by_name: dict[str, list[float]] = {}
  loads = {}
  for key, value in metrics.items():
    if not key.startswith("moe/"):
      continue
    layer, name = key[len("moe/"):].rsplit("/", 1)
    if name == "expert_load":
      loads[layer] = np.asarray(value)
    elif np.ndim(value) == 0:
      by_name.setdefault(name, []).append(float(value))
  out: dict[str, Any] = {f"mean_{k}": float(np.mean(v)) for k, v in by_name.items()}
  out["expert_load"] = loads
  return out


class MetricsLogger:
  """TensorBoard (clu SummaryWriter) + JSON lines; only process 0 writes.

  Scalars go to both; a vector metric such as moe/<layer>/expert_load becomes a TensorBoard
  histogram and a list in the JSON line.
  """

  def __init__(self, logdir: str, jsonl_path: str | None):
    self.active = jax.process_index() == 0
    self.logdir, self.jsonl_path = logdir, jsonl_path
    if self.active:
      moe_jax.import_tensorflow()  # clu imports it: without its start-up notices
      from clu import metric_writers  # pylint: disable=import-outside-toplevel
      self.writer = metric_writers.SummaryWriter(logdir)
      self.jsonl = open(jsonl_path, "a") if jsonl_path else None

  def write(self, step: int, metrics: Mapping[str, Any], **extra: Any) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    hists = {k: np.asarray(v) for k, v in metrics.items() if np.ndim(v) > 0}
    self.writer.write_scalars(step, scalars)
    if hists:
      self.writer.write_histograms(step, hists)
    self.writer.flush()
    if self.jsonl:
      # time: Unix seconds when the row was written (as TensorBoard's wall_time), so a run's
      # time to a given loss reads back from its JSON lines.
      row = dict(step=step, time=round(time.time(), 2), **extra, **scalars,
                 **{k: v.tolist() for k, v in hists.items()})
      self.jsonl.write(json.dumps(row) + "\n")
      self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      self.writer.close()
      if self.jsonl:
        self.jsonl.close()


def drop_rows_after(jsonl_path: str, step: int) -> None:
  """Removes rows logged after `step`, atomically, with a one-line warning: a run resumed at
  `step` logs those steps again."""
  if not os.path.exists(jsonl_path):
    return
  with open(jsonl_path) as f:
    rows = [(json.loads(r)["step"], r) for r in f if r.strip()]
  dropped = [s for s, _ in rows if s > step]
  if dropped:
    logging.warning("%s: dropping %d rows of steps %d-%d, logged after step %d where this run "
                    "starts; it logs those steps again", jsonl_path, len(dropped), min(dropped),
                    max(dropped), step)
    with open(jsonl_path + ".tmp", "w") as f:
      f.writelines(r for s, r in rows if s <= step)
    os.replace(jsonl_path + ".tmp", jsonl_path)
