"""Expert-specialisation inspector: what each expert of a checkpoint's MoE layers receives.

  python -m moe_jax.inspect --gin_file=gin/models/switch_tiny.gin \\
    --gin_file=gin/runs/inspect.gin --gin.CHECKPOINT_PATH=\\"runs/switch_tiny\\" \\
    --gin.MIXTURE_OR_TASK_NAME=\\"multidomain_span_corruption\\"

Flags as in moe_jax.train. Routes EVAL_STEPS batches of a task's validation examples (of each
task, for a mixture) through the checkpoint (deterministic: eval capacity factor, no jitter) and
writes to INSPECT_OUTPUT_DIR (default <model dir>/inspect):

  report.md / report.json  per MoE layer and expert: the tokens the router sends there (its
    first choice; the most frequent ones, as ST-MoE Table 9), load (share of the kept
    assignments, the training metric expert_load), drop rate (share of its first-choice tokens
    that found no slot), mean router confidence (top-1 probability) of its tokens;
  heatmap.png  expert x column, each column's tokens split over the experts.

Columns: for the synthetic multi-domain corpus (`multidomain_*` tasks) the domain of a token,
read off the corpus' known chains: the domain whose Markov chain holds the bigram (previous
token, token), when exactly one does (other tokens are left out and counted); with it the mutual
information I(domain; expert) in nats and bits (0: the router ignores the domain; H(domain) if
it sends each domain to its own experts). For a seqio mixture its tasks, named without the words
their names share (the manual-pages mixture's manpages_<lang>_<objective>: the languages): a
token's column is the task its example came from, with I(task; expert) (I / H(task): how much
the routing follows the task, the language). Other tasks: token classes (word start, word piece,
number, punctuation, sentinel, EOS, ...), with I(class; expert).

A layer's tokens are the ones it routes: encoder layers the encoder input tokens, decoder
layers the decoder input tokens (the previous target token; position 0 is the start token).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from moe_jax import evaluation
from moe_jax import partitioning
from moe_jax import restore
from moe_jax import routing
from moe_jax import train
from moe_jax import validation
from moe_jax.checkpoints import orbax_utils

Array = jax.Array
PyTree = Any
_WORD_START = "\u2581"  # SentencePiece's word-boundary marker


# ---- routing decisions ------------------------------------------------------------------------


def routing_fn(model: Any) -> Callable[[PyTree, Mapping[str, Array]], dict[str, dict[str, Array]]]:
  """(params, batch) -> {MoE layer path: per-token routing} of a deterministic forward pass.

  Per layer, over its [g, s] group slots: first (the router's first choice, int32), confidence
  (its probability), first_kept (it holds a slot there), routed (the token holds any slot),
  valid (a real token); and kept_per_expert [e] (kept assignments). Read from the layers' routers
  with flax method interception, so the model is unchanged.
  """
  def fn(params, batch):
    captured: dict[str, dict[str, Any]] = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, routing.Router):
        layer = captured.setdefault("/".join(module.scope.path[:-1]), {})
        if context.method_name == "router_logits":
          layer["logits"] = out
        elif context.method_name == "__call__":
          layer.update(decision=out, valid=kwargs["valid"])
      return out

    with nn.intercept_methods(record):
      model.logits(params, batch)
    out = {}
    for path, layer in captured.items():
      probs = jax.nn.softmax(layer["logits"], axis=-1)  # [g,s,e]
      d = layer["decision"]
      first = jnp.argmax(probs, axis=-1).astype(jnp.int32)  # [g,s]
      num_experts = probs.shape[-1]
      out[path] = {
          "first": first,
          "confidence": jnp.max(probs, axis=-1),
          "first_kept": jnp.any(d.kept & (d.expert_index == first[..., None]), axis=-1),
          "routed": jnp.any(d.kept, axis=-1),
          "valid": layer["valid"],
          "kept_per_expert": jnp.einsum("gske,gsk->e", jax.nn.one_hot(d.expert_index, num_experts),
                                        d.kept.astype(jnp.float32)),
      }
    return out
  return fn


# ---- columns: domains or token classes --------------------------------------------------------


def token_pieces(vocabulary: Any, size: int) -> list[str]:
  """A readable string for every id < size (PAD/start, EOS, sentinels, pieces)."""
  tokenizer = vocabulary.tokenizer
  base = vocabulary.vocab_size - vocabulary.extra_ids
  names = []
  for i in range(size):
    if i == 0:
      names.append("<pad/start>")
    elif i == 1:
      names.append("</s>")
    elif base <= i < vocabulary.vocab_size:
      names.append(f"<extra_id_{vocabulary.vocab_size - 1 - i}>")
    elif i < tokenizer.get_piece_size():
      names.append(tokenizer.id_to_piece(i))
    else:
      names.append(f"<unused_{i}>")
  return names


TOKEN_CLASSES = ("start/pad", "EOS", "sentinel", "word start", "word piece", "number",
                 "punctuation", "other")


def token_classes(pieces: Sequence[str]) -> np.ndarray:
  """Class index (TOKEN_CLASSES) of each id, from its piece."""
  out = np.empty(len(pieces), np.int32)
  for i, piece in enumerate(pieces):
    text = piece.removeprefix(_WORD_START)
    if i == 0:
      cls = "start/pad"
    elif i == 1:
      cls = "EOS"
    elif piece.startswith("<extra_id_"):
      cls = "sentinel"
    elif text.isdigit():
      cls = "number"
    elif text and all(not c.isalnum() for c in text):
      cls = "punctuation"
    elif text.replace("_", "").isalnum():
      cls = "word start" if piece.startswith(_WORD_START) else "word piece"
    else:
      cls = "other"
    out[i] = TOKEN_CLASSES.index(cls)
  return out


@dataclasses.dataclass(frozen=True)
class Columns:
  """What the heatmap's columns are: kind ('task', 'domain' or 'token class'), their names,
  and label(tokens [b,l], task) -> [b,l] column index, -1 where unknown; task: the index of the
  batch's task (inspect's batches)."""
  kind: str
  names: tuple[str, ...]
  label: Callable[[np.ndarray, int], np.ndarray]


def class_columns(pieces: Sequence[str]) -> Columns:
  classes = token_classes(pieces)
  return Columns("token class", TOKEN_CLASSES, lambda tokens, _: classes[tokens])


def mixture_columns(tasks: Sequence[str]) -> Columns:
  """A mixture's tasks: a token's column is its batch's task."""
  return Columns("task", evaluation.short_task_names(tasks),
                 lambda tokens, task: np.full(tokens.shape, task))


def domain_columns(spec: Any, vocabulary: Any, size: int) -> Columns:
  """Domains of the multi-domain corpus (corpora.MultiDomainSpec): a token's domain is the one
  whose chain holds the bigram (previous token, token), when exactly one does."""
  from moe_jax import corpora  # pylint: disable=import-outside-toplevel
  tables = corpora.domain_tables(spec)
  word_of = np.full(size, -1, np.int64)  # token id -> word index
  for w, word in enumerate(spec.words):
    word_of[vocabulary.tokenizer.piece_to_id(_WORD_START + word)] = w
  n = len(spec.words)
  chains = np.zeros((n, n), np.int64)  # [previous word, word] -> bit set of domains
  for d in range(spec.num_domains):
    np.bitwise_or.at(chains, (np.arange(n)[:, None], tables.next[d]), 1 << d)

  def label(tokens: np.ndarray, _: int) -> np.ndarray:
    words = word_of[tokens]
    prev = np.concatenate([np.full_like(words[:, :1], -1), words[:, :-1]], axis=1)
    known = (words >= 0) & (prev >= 0)
    bits = np.where(known, chains[np.maximum(prev, 0), np.maximum(words, 0)], 0)
    unique = (bits > 0) & ((bits & (bits - 1)) == 0)
    return np.where(unique, np.log2(np.maximum(bits, 1)).astype(np.int64), -1)

  return Columns("domain", tuple(f"domain {d}" for d in range(spec.num_domains)), label)


def task_columns(mixture_or_task_name: str, vocabulary: Any, size: int,
                 pieces: Sequence[str]) -> Columns:
  """A mixture's tasks, domains for a multi-domain corpus task, token classes otherwise."""
  from moe_jax import corpora  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel  (after data registered the tasks)
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Mixture):
    return mixture_columns(evaluation.task_names(mixture_or_task_name))
  source = getattr(provider, "source", None)
  if isinstance(source, corpora.MultiDomainSource):
    return domain_columns(source.spec, vocabulary, size)
  return class_columns(pieces)


# ---- statistics -------------------------------------------------------------------------------


def mutual_information(joint: np.ndarray) -> float:
  """I(X; Y) in nats of a joint count table [x, y]."""
  total = joint.sum()
  if total == 0:
    return 0.0
  p = joint / total
  px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
  nz = p > 0
  return float(np.sum(p[nz] * np.log(p[nz] / (px @ py)[nz])))


def entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-np.sum(p * np.log(p)))


class LayerStats:
  """Running counts of one MoE layer's routing (host side, numpy)."""

  def __init__(self, num_experts: int, vocab_size: int, num_columns: int):
    self.tokens = np.zeros((num_experts, vocab_size), np.int64)  # first choice x token id
    self.columns = np.zeros((num_experts, num_columns), np.int64)  # first choice x column
    self.first_kept = np.zeros(num_experts, np.int64)
    self.confidence = np.zeros(num_experts)
    self.kept = np.zeros(num_experts)  # kept assignments
    self.valid = self.dropped = self.unlabelled = 0

  def add(self, routed: Mapping[str, np.ndarray], tokens: np.ndarray, labels: np.ndarray):
    """routed: one layer of routing_fn's output on host; tokens, labels [g,s]."""
    valid = routed["valid"]
    first = routed["first"][valid]
    np.add.at(self.tokens, (first, tokens[valid]), 1)
    labelled = labels[valid] >= 0
    np.add.at(self.columns, (first[labelled], labels[valid][labelled]), 1)
    self.unlabelled += int((~labelled).sum())
    np.add.at(self.first_kept, first, routed["first_kept"][valid].astype(np.int64))
    np.add.at(self.confidence, first, routed["confidence"][valid])
    self.kept += routed["kept_per_expert"]
    self.valid += int(valid.sum())
    self.dropped += int((valid & ~routed["routed"]).sum())

  def report(self, pieces: Sequence[str], columns: Columns, top: int) -> dict[str, Any]:
    per_expert = self.tokens.sum(1)
    experts = []
    for e in range(len(per_expert)):
      order = np.lexsort((np.arange(self.tokens.shape[1]), -self.tokens[e]))[:top]
      n = int(per_expert[e])
      experts.append({
          "expert": e, "tokens": n, "token_share": n / max(self.valid, 1),
          "load": float(self.kept[e] / max(self.kept.sum(), 1)),
          "drop_rate": float(1 - self.first_kept[e] / n) if n else 0.0,
          "confidence": float(self.confidence[e] / n) if n else None,
          "top_tokens": [{"id": int(i), "piece": pieces[i], "count": int(self.tokens[e, i])}
                         for i in order if self.tokens[e, i] > 0],
      })
    mi = mutual_information(self.columns)
    return {
        "tokens": self.valid, "fraction_dropped": self.dropped / max(self.valid, 1),
        "router_confidence": float(self.confidence.sum() / max(self.valid, 1)),
        "experts": experts, "columns": list(columns.names), "column_kind": columns.kind,
        "column_counts": self.columns.tolist(),
        "labelled_fraction": 1 - self.unlabelled / max(self.valid, 1),
        "mutual_information_nats": mi, "mutual_information_bits": mi / np.log(2),
        "column_entropy_nats": entropy(self.columns.sum(0)),
    }


def inspect(model: Any, params: PyTree,
            batches: Mapping[str, Iterable[Mapping[str, np.ndarray]]], *,
            pieces: Sequence[str], columns: Columns, top_tokens: int = 10,
            jit: Callable[..., Any] = jax.jit) -> dict[str, Any]:
  """Routes each task's batches ({task: batches}) through the model -> {'layers': {path:
  layer report}}.

  pieces: a readable string per id (the model's vocabulary size); jit: e.g. a Partitioner's
  jit for sharded params.
  """
  route = jit(routing_fn(model))
  stats: dict[str, LayerStats] = {}
  for task, batch in ((t, b) for t, bs in enumerate(batches.values()) for b in bs):
    routed = jax.device_get(route(params, batch))
    for path, layer in routed.items():
      g, s = layer["first"].shape
      key = "encoder_input_tokens" if path.startswith("encoder") else "decoder_input_tokens"
      tokens = np.asarray(batch[key])
      labels = columns.label(tokens, task).reshape(-1)
      pad = g * s - tokens.size
      tokens = np.pad(tokens.reshape(-1), (0, pad)).reshape(g, s)
      labels = np.pad(labels, (0, pad), constant_values=-1).reshape(g, s)
      if path not in stats:
        stats[path] = LayerStats(len(layer["kept_per_expert"]), len(pieces), len(columns.names))
      stats[path].add(layer, tokens, labels)
  if not stats:
    raise ValueError("the model has no MoE layer")
  return {"layers": {path: s.report(pieces, columns, top_tokens)
                     for path, s in sorted(stats.items())}}


# ---- output ---------------------------------------------------------------------------------


def _shown(piece: str) -> str:
  return "`" + piece.replace("`", "'").replace("|", "\\|") + "`"


def markdown(report: Mapping[str, Any]) -> str:
  lines = [f"# Expert inspector: {report.get('checkpoint', '(params)')}", ""]
  if "task" in report:
    lines += [f"Task `{report['task']}` ({report['split']} split, {report['batches']} batches), "
              f"step {report['step']}. Deterministic routing (eval capacity factor). An "
              "expert's tokens are those the router sends it first; load is its share of the "
              "kept assignments; drop rate the share of its tokens that found no slot; "
              "confidence their mean top-1 router probability.", ""]
  for path, layer in report["layers"].items():
    kind, h = layer["column_kind"], layer["column_entropy_nats"]
    share = f" (I / H = {layer['mutual_information_nats'] / h:.1%})" if h > 0 else ""
    lines += [f"## {path}", "",
              f"{layer['tokens']} tokens, {layer['fraction_dropped']:.2%} dropped, mean router "
              f"confidence {layer['router_confidence']:.3f}. Mutual information between "
              f"{kind} and expert: **{layer['mutual_information_nats']:.4f} nats "
              f"({layer['mutual_information_bits']:.4f} bits)** of H({kind}) = {h:.4f} nats "
              f"({h / np.log(2):.4f} bits){share}, over the "
              f"{layer['labelled_fraction']:.1%} of tokens with a known {kind}.", "",
              "| expert | tokens | load | drop rate | confidence | most frequent tokens |",
              "|---|---|---|---|---|---|"]
    for e in layer["experts"]:
      conf = "–" if e["confidence"] is None else f"{e['confidence']:.3f}"
      top = ", ".join(f"{_shown(t['piece'])} {t['count']}" for t in e["top_tokens"])
      lines.append(f"| {e['expert']} | {e['tokens']} ({e['token_share']:.1%}) | "
                   f"{e['load']:.3f} | {e['drop_rate']:.1%} | {conf} | {top} |")
    lines.append("")
  return "\n".join(lines)


def heatmap(report: Mapping[str, Any]) -> Any:
  """A matplotlib Figure, one panel per MoE layer: P(expert | column), each column's tokens
  over the experts."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  layers = report["layers"]
  width = max(5.5, 1.5 + 0.3 * max(len(layer["columns"]) for layer in layers.values()))
  fig = Figure(figsize=(width * len(layers), 4.5), layout="constrained")
  axes = fig.subplots(1, len(layers), squeeze=False)
  for ax, (name, layer) in zip(axes[0], layers.items()):
    counts = np.asarray(layer["column_counts"], np.float64)
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=max(share.max(), 1e-9), aspect="auto")
    ax.set_xticks(range(len(layer["columns"])), layer["columns"], rotation=45, ha="right")
    ax.set_yticks(range(len(layer["experts"])))
    ax.set(xlabel=layer["column_kind"], ylabel="expert (first choice)",
           title=f"{name}\nI = {layer['mutual_information_nats']:.3f} nats "
                 f"({layer['mutual_information_bits']:.3f} bits)")
    fig.colorbar(im, ax=ax, label=f"share of the {layer['column_kind']}'s tokens")
  return fig


def write_report(report: Mapping[str, Any], output_dir: str) -> dict[str, str]:
  """report.json, report.md and heatmap.png in output_dir -> their paths."""
  out = epath.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"json": str(out / "report.json"), "markdown": str(out / "report.md"),
           "heatmap": str(out / "heatmap.png")}
  epath.Path(paths["json"]).write_text(json.dumps(report, indent=1))
  epath.Path(paths["markdown"]).write_text(markdown(report))
  heatmap(report).savefig(paths["heatmap"], dpi=110)
  return paths


# ---- the command ------------------------------------------------------------------------------


@gin.configurable
def inspect_checkpoint(*, model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
                       mixture_or_task_name: str = gin.REQUIRED,
                       task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
                       batch_size: int = gin.REQUIRED, output_dir: str | None = None,
                       split: str = "validation", eval_steps: int | None = 20,
                       top_tokens: int = 10,
                       partitioner: partitioning.Partitioner | None = None) -> dict[str, Any]:
  """Inspects the checkpoint's MoE layers on a task's examples and writes the report.

  checkpoint_path: a checkpoint_<step> directory or a model dir (latest step) [CHECKPOINT_PATH].
  output_dir: default <model dir>/inspect [INSPECT_OUTPUT_DIR]. eval_steps: batches (None: the
  whole split) [EVAL_STEPS]. top_tokens: tokens listed per expert [TOP_TOKENS].
  Returns the report with 'paths' (json, markdown, heatmap) added. One process: the report
  counts the tokens of this process's batches.
  """
  validation.integer("TOP_TOKENS", top_tokens, minimum=1)
  validation.integer("EVAL_STEPS", eval_steps, minimum=1, allow_none=True)
  if jax.process_count() > 1:
    raise validation.SettingError("process_count", "the inspector runs in one process")
  c = model.module.config
  if not (c.encoder_sparse_step or c.decoder_sparse_step):
    raise validation.SettingError("MODEL", "the model has no MoE layer to inspect "
                                           "(ENCODER_SPARSE_STEP = DECODER_SPARSE_STEP = 0)")
  # One example per row (no packing): a row's tokens are one text's.
  trainer, params, model_dir, step = restore.restore_for_inference(
      model, partitioner, task_feature_lengths, batch_size, False, checkpoint_path,
      mixture_or_task_name, split)
  import seqio  # pylint: disable=import-outside-toplevel  (after data registered the tasks)
  vocabulary = seqio.get_mixture_or_task(mixture_or_task_name).output_features[
      "targets"].vocabulary
  pieces = token_pieces(vocabulary, c.vocab_size)
  columns = task_columns(mixture_or_task_name, vocabulary, c.vocab_size, pieces)
  batches = {task: list(evaluation.eval_batches(
      task, task_feature_lengths=task_feature_lengths, batch_size=batch_size, split=split,
      eval_steps=eval_steps, pack=False)) for task in evaluation.task_names(mixture_or_task_name)}
  example = next(b for bs in batches.values() for b in bs)

  def jit(fn):  # params in their shardings, the batch sharded like training's
    compiled = trainer.partitioner.jit(
        fn, in_shardings=(trainer.params_shardings, trainer.batch_shardings(example)),
        out_shardings=trainer.replicated)
    return lambda p, batch: compiled(p, trainer.partitioner.shard_batch(batch))

  report = inspect(model, params, batches, pieces=pieces, columns=columns,
                   top_tokens=top_tokens, jit=jit)
  report = {"checkpoint": checkpoint_path, "step": step, "task": mixture_or_task_name,
            "tasks": {task: len(bs) for task, bs in batches.items()}, "split": split,
            "batches": sum(map(len, batches.values())), **report}
  output_dir = orbax_utils.absolute(output_dir or os.path.join(model_dir, "inspect"))
  if jax.process_index() == 0:
    report["paths"] = write_report(report, output_dir)
  return report


def main(argv: Sequence[str] | None = None) -> None:
  report = train.run(inspect_checkpoint, argv, "moe_jax.inspect")
  if jax.process_index() == 0:
    print(f"Inspected {report['checkpoint']} on {report['task']} ({report['split']}):")
    for path, layer in report["layers"].items():
      print(f"  {path}: {layer['tokens']} tokens, {layer['fraction_dropped']:.2%} dropped, "
            f"I({layer['column_kind']}; expert) = {layer['mutual_information_nats']:.4f} nats "
            f"({layer['mutual_information_bits']:.4f} bits) of H = "
            f"{layer['column_entropy_nats']:.4f} nats")
    for kind, path in report["paths"].items():
      print(f"{kind}: {path}")


if __name__ == "__main__":
  # Run the importable module, not this __main__ copy, so gin's bindings (made against
  # moe_jax.inspect.inspect_checkpoint) apply.
  from moe_jax import inspect as _inspect
  _inspect.main()
