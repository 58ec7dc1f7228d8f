"""seqio tasks, the embedded default corpus and the SentencePiece vocabulary (t5x conventions).

Importing this module registers the seqio tasks

  pydocs_span_corruption   T5 span corruption on the embedded corpus (no download)
  pydocs_prefix_lm         prefix LM on the embedded corpus
  pystdlib_span_corruption / pystdlib_prefix_lm        the Python stdlib's source (corpora.py)
  multidomain_span_corruption / multidomain_prefix_lm  the synthetic multi-domain corpus
  c4_v220_span_corruption  T5 span corruption on TFDS 'c4/en:2.2.0' (the t5x pre-training task)

The embedded corpus is the Python standard library's documentation topics
(`pydoc_data.topics`, ~465 KB of English), present on any machine with Python. Its vocabulary is
a unigram SentencePiece model (T5 ids: pad=0, eos=1, unk=2, 100 sentinels at the top) trained on
first use and cached under $MOE_JAX_CACHE_DIR (default ~/.cache/moe_jax).

Every task's vocabulary is `get_vocabulary()` as configured by gin when the task is used, so
`get_vocabulary.sentencepiece_model_file = '/path/spm.model'` swaps the vocabulary of every
task. `register_text_files_task` / `register_tfds_task` turn a user's own text into a task.

`get_dataset` feeds the trainer: seqio task -> EncDecFeatureConverter -> this process's rows
of each global batch as numpy int32 arrays, deterministic for a seed, resumable from a JSON-able
state, and the same global stream for any number of processes (fixed num_shards).
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import pydoc_data.topics
import sentencepiece as spm
from absl import logging

import moe_jax

# The input pipeline runs on the host CPU (TF's start-up notices dropped, GPUs hidden from it);
# before seqio, which imports TensorFlow too.
tf = moe_jax.import_tensorflow()
import seqio  # noqa: E402  pylint: disable=wrong-import-position

from moe_jax import corpora, objectives  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_TASK = "pydocs_span_corruption"
DEFAULT_VOCAB_SIZE = 2000
DEFAULT_EXTRA_IDS = 100
C4_TFDS_NAME = "c4/en:2.2.0"
VALIDATION_PERCENT = 5
_MAX_DOC_CHARS = 1500  # paragraphs of one topic are grouped into documents up to this size
_SPM_OPTIONS = dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                    character_coverage=0.9995, num_threads=1, minloglevel=2)
_SPM_MAX_SENTENCES = 100_000


# ---------------------------------------------------------------------------------------------
# Embedded corpus


@functools.cache
def _corpus_documents() -> tuple[str, ...]:
  """All documents: consecutive paragraphs of each pydoc topic, up to ~_MAX_DOC_CHARS each.

  Topics share sections (e.g. 'try' and 'compound'); repeated documents are kept once.
  """
  docs = []
  for topic in sorted(pydoc_data.topics.topics):
    current = ""
    for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic]):
      para = para.strip()
      if not para:
        continue
      if current and len(current) + len(para) > _MAX_DOC_CHARS:
        docs.append(current)
        current = ""
      current = f"{current}\n\n{para}" if current else para
    if current:
      docs.append(current)
  return tuple(dict.fromkeys(docs))


def _is_validation(text: str) -> bool:
  # A content hash (not a position) keeps duplicates in one split and the split stable.
  return int(hashlib.md5(text.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


@functools.cache
def corpus_split(split: str) -> tuple[str, ...]:
  """Documents of the embedded corpus in corpus order; split is 'train' or 'validation'."""
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation' for the embedded corpus, "
                     f"got {split!r}")
  return tuple(d for d in _corpus_documents() if _is_validation(d) == (split == "validation"))


class PydocsSource(corpora.DocumentsSource):
  """seqio source of the embedded corpus: {'text': tf.string} per document."""

  def __init__(self):
    super().__init__(corpus_split)


# ---------------------------------------------------------------------------------------------
# Vocabulary


def cache_dir() -> str:
  """$MOE_JAX_CACHE_DIR, default ~/.cache/moe_jax (read at each call)."""
  return os.path.expanduser(os.environ.get("MOE_JAX_CACHE_DIR", "~/.cache/moe_jax"))


def train_sentencepiece(texts: Sequence[str], vocab_size: int, model_path: str) -> str:
  """Trains a T5-convention unigram SentencePiece model on texts and writes it to model_path.

  Ids: pad=0, eos=1, unk=2, no bos. The file is written atomically (temp file + os.replace), so
  concurrent writers of the same model never leave a truncated file behind.
  """
  lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
  if len(lines) > _SPM_MAX_SENTENCES:  # an evenly spaced sample, deterministic
    lines = lines[::-(-len(lines) // _SPM_MAX_SENTENCES)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                 vocab_size=vocab_size, **_SPM_OPTIONS)
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(model.getvalue())
    os.replace(tmp, model_path)
  except BaseException:
    os.unlink(tmp)
    raise
  return model_path


# Corpora a default vocabulary can be trained on: name -> training documents.
VOCABULARY_CORPORA: dict[str, Callable[[], Sequence[str]]] = {
    "pydocs": lambda: corpus_split("train"),
    "pystdlib": lambda: corpora.stdlib_split("train"),
}


@functools.cache
def _model_key(corpus: str, vocab_size: int) -> str:
  digest = hashlib.sha256()
  for text in VOCABULARY_CORPORA[corpus]():
    digest.update(text.encode())
    digest.update(b"\0")
  digest.update(json.dumps(dict(_SPM_OPTIONS, vocab_size=vocab_size), sort_keys=True).encode())
  return digest.hexdigest()[:16]


def default_sentencepiece_model(vocab_size: int = DEFAULT_VOCAB_SIZE,
                                corpus: str = "pydocs") -> str:
  """Path of a corpus' SentencePiece model; trains it if it is not cached (pydocs ~1 s, the
  stdlib ~1 min: on at most _SPM_MAX_SENTENCES of its lines).

  The file name holds a hash of the corpus and training options, so a new Python (new docs) or
  another vocab size gets its own file and an existing one is never retrained.
  """
  if corpus not in VOCABULARY_CORPORA:
    raise ValueError(f"vocabulary corpus must be one of {sorted(VOCABULARY_CORPORA)}, "
                     f"got {corpus!r}")
  name = f"{corpus}_unigram_{vocab_size}_{_model_key(corpus, vocab_size)}.model"
  path = os.path.join(cache_dir(), name)
  if not os.path.exists(path):
    train_sentencepiece(VOCABULARY_CORPORA[corpus](), vocab_size, path)
  return path


@functools.cache
def _load_vocabulary(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  try:
    vocab.tokenizer  # pylint: disable=pointless-statement  (loads the file)
  except Exception as e:  # noqa: BLE001  missing, unreadable, not a SentencePiece model
    from moe_jax.validation import SettingError  # pylint: disable=import-outside-toplevel
    raise SettingError("data.get_vocabulary.sentencepiece_model_file",
                       f"{path} is not a readable SentencePiece model "
                       f"({type(e).__name__}: {str(e).strip()[:120]})") from None
  ids = (vocab.tokenizer.pad_id(), vocab.eos_id, vocab.unk_id)
  if ids != (0, 1, 2):
    raise ValueError(f"sentencepiece_model_file {path} has (pad, eos, unk) ids {ids}; "
                     "T5 conventions need (0, 1, 2)")
  return vocab


@gin.configurable
def get_vocabulary(sentencepiece_model_file: str | None = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE,
                   extra_ids: int = DEFAULT_EXTRA_IDS,
                   corpus: str = "pydocs") -> seqio.SentencePieceVocabulary:
  """The vocabulary of every task here (gin-configurable).

  sentencepiece_model_file: a T5-style model (pad=0, eos=1, unk=2); None = a model with
  vocab_size pieces trained on `corpus` (one of VOCABULARY_CORPORA; vocab_size and corpus are
  ignored for a given file). extra_ids sentinels are appended, <extra_id_0> = the last id.
  Total size: vocab_size + extra_ids.
  """
  if sentencepiece_model_file is None:
    sentencepiece_model_file = default_sentencepiece_model(vocab_size, corpus)
  return _load_vocabulary(sentencepiece_model_file, extra_ids)


class ConfiguredVocabulary(seqio.Vocabulary):
  """Stands for `get_vocabulary()` under the gin config in force when it is used.

  Tasks are registered on import, before gin files are parsed; this lets a gin binding of
  get_vocabulary choose the vocabulary of the already-registered tasks.
  """

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def vocabulary(self) -> seqio.SentencePieceVocabulary:
    return get_vocabulary()

  @property
  def sentencepiece_model_file(self) -> str:
    return self.vocabulary.sentencepiece_model_file

  @property
  def tokenizer(self) -> spm.SentencePieceProcessor:
    return self.vocabulary.tokenizer

  @property
  def eos_id(self) -> int | None:
    return self.vocabulary.eos_id

  @property
  def unk_id(self) -> int | None:
    return self.vocabulary.unk_id

  @property
  def pad_id(self) -> int:
    return self.vocabulary.pad_id

  @property
  def extra_ids(self) -> int:
    return self.vocabulary.extra_ids

  @property
  def vocab_size(self) -> int:
    return self.vocabulary.vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.vocabulary.vocab_size - self.vocabulary.extra_ids

  def _encode(self, s):
    return self.vocabulary.encode(s)

  def _decode(self, ids):
    return self.vocabulary.decode(ids)

  def _encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def _decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  # The wrapped vocabulary cleans ids itself; the base class' cleaning would map sentinels to unk.
  def decode(self, ids):
    return self.vocabulary.decode(ids)

  def decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  def __eq__(self, other):
    other = other.vocabulary if isinstance(other, ConfiguredVocabulary) else other
    return self.vocabulary == other

  def __str__(self) -> str:
    return f"ConfiguredVocabulary({self.vocabulary})"


# ---------------------------------------------------------------------------------------------
# Tasks

def _text_to_targets(text_key: str) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  return lambda ds: ds.map(lambda x: {"targets": x[text_key]},
                           num_parallel_calls=tf.data.AUTOTUNE)


def _line_to_targets(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def _add_task(name: str, source: seqio.DataSource, to_targets: Callable, objective: str,
              vocabulary: seqio.Vocabulary | None) -> str:
  """(Re-)registers a T5-style task: text -> tokens -> cache point -> objective -> EOS."""
  if objective not in objectives.OBJECTIVES:
    raise ValueError(
        f"objective must be one of {sorted(objectives.OBJECTIVES)}, got {objective!r}")
  if vocabulary is None:
    vocabulary = ConfiguredVocabulary()
  # Re-registering the same name replaces the task, so a gin file may be parsed twice.
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[to_targets, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     objectives.OBJECTIVES[objective], seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
      metric_fns=[])
  return name


@gin.configurable
def register_text_files_task(name: str, train_files: str | Sequence[str],
                             validation_files: str | Sequence[str] | None = None,
                             objective: str = "span_corruption",
                             vocabulary: seqio.Vocabulary | None = None) -> str:
  """Registers a task over plain-text files (one document per line; globs allowed).

  objective: 'span_corruption' or 'prefix_lm'. vocabulary None = get_vocabulary() as configured.
  Returns name, so gin can write `MIXTURE_OR_TASK_NAME = @data.register_text_files_task()`.
  """
  splits = {"train": train_files}
  if validation_files is not None:
    splits["validation"] = validation_files
  return _add_task(name, seqio.TextLineDataSource(splits), _line_to_targets, objective, vocabulary)


@gin.configurable
def register_tfds_task(name: str, tfds_name: str, text_key: str = "text",
                       objective: str = "span_corruption", tfds_data_dir: str | None = None,
                       vocabulary: seqio.Vocabulary | None = None) -> str:
  """Registers a task over a TFDS dataset's text feature, e.g. tfds_name='c4/en:3.1.0'.

  Returns name (see register_text_files_task).
  """
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)
  return _add_task(name, source, _text_to_targets(text_key), objective, vocabulary)


MULTIDOMAIN_NUM_WORDS = 1024


@functools.cache
def multidomain_words(num_words: int = MULTIDOMAIN_NUM_WORDS) -> tuple[str, ...]:
  """The multi-domain corpus' words: the default vocabulary's first num_words pieces that are
  whole alphabetic words, so that each word is one token of that vocabulary."""
  tokenizer = _load_vocabulary(default_sentencepiece_model(), DEFAULT_EXTRA_IDS).tokenizer
  pieces = (tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size()))
  words = [p[1:] for p in pieces if p.startswith("\u2581") and p[1:].isalpha() and len(p) > 2]
  if len(words) < num_words:
    raise ValueError(f"the default vocabulary has {len(words)} whole-word pieces, fewer than "
                     f"num_words={num_words}")
  return tuple(words[:num_words])


@gin.configurable
def register_multidomain_task(name: str = "multidomain_span_corruption",
                              objective: str = "span_corruption", num_domains: int = 8,
                              num_words: int = MULTIDOMAIN_NUM_WORDS, successors: int = 8,
                              seed: int = 0) -> str:
  """Registers a task over the synthetic multi-domain corpus (corpora.MultiDomainSpec) with
  other settings than the default `multidomain_*` tasks. Returns name (for gin)."""
  spec = lambda: corpora.MultiDomainSpec(multidomain_words(num_words), num_domains=num_domains,
                                         successors=successors, seed=seed)
  return _add_task(name, corpora.MultiDomainSource(spec), _text_to_targets("text"), objective,
                   None)


def _register_default_tasks() -> None:
  for prefix, source in [("pydocs", PydocsSource()), ("pystdlib", corpora.StdlibSource())]:
    for objective in objectives.OBJECTIVES:
      _add_task(f"{prefix}_{objective}", source, _text_to_targets("text"), objective, None)
  for objective in objectives.OBJECTIVES:
    register_multidomain_task(f"multidomain_{objective}", objective)
  # Not via register_tfds_task: that one's gin bindings (a user's own task) must not leak in.
  _add_task("c4_v220_span_corruption", seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME),
            _text_to_targets("text"), "span_corruption", None)


_register_default_tasks()


def check_task(mixture_or_task_name: str, splits: Sequence[str]) -> int:
  """Validates a task or mixture before training: registered, has the splits, its text files
  exist and are non-empty UTF-8 (the first MiB of each), its vocabulary loads. Returns the
  vocabulary size; raises validation.SettingError."""
  from moe_jax.validation import SettingError  # pylint: disable=import-outside-toplevel
  try:
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise SettingError("MIXTURE_OR_TASK_NAME", f"unknown task or mixture "
                       f"{mixture_or_task_name!r}; registered: {', '.join(known)}") from None
  for task in getattr(provider, "tasks", None) or [provider]:
    for split in splits:
      if split not in task.source.splits:
        raise SettingError("SPLIT", f"task {task.name!r} has no split {split!r}; it has "
                                    f"{', '.join(task.source.splits)}")
      if isinstance(task.source, seqio.TextLineDataSource):
        _check_text_files(task.name, split, task.source.list_shards(split))
  return provider.output_features["targets"].vocabulary.vocab_size


def _check_text_files(task: str, split: str, files: Sequence[str]) -> None:
  from moe_jax.validation import SettingError  # pylint: disable=import-outside-toplevel
  setting = f"data.register_text_files_task.{split}_files"
  if not files:
    raise SettingError(setting, f"no file matches the {split} pattern of task {task!r}")
  if all(tf.io.gfile.stat(f).length == 0 for f in files):
    raise SettingError(setting, f"the {split} files of task {task!r} are empty: {files[:3]}")
  for path in files:
    with tf.io.gfile.GFile(path, "rb") as f:
      head = f.read(1 << 20)
    try:  # incremental: a character cut at the 1 MiB boundary is not an error
      codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
      raise SettingError(setting, f"{path} is not UTF-8 text (byte {e.start}: "
                                  f"{head[e.start:e.start + 4]!r})") from None


# Examples check_feature_lengths reads per task, from at most this many source documents.
_LENGTH_PROBE_EXAMPLES = 64
_LENGTH_PROBE_DOCUMENTS = 2000
# TF's C++ log of a failing pipeline: a warning line and the failing op on the next.
_PIPELINE_ERROR_LOG = re.compile(r"W\d{4} .*local_rendezvous\.cc:\d+\] Local rendezvous is "
                                 r"aborting|\s+\[\[\{\{node ")


def _untrimmed_examples(task: seqio.Task, lengths: Mapping[str, int], split: str
                        ) -> list[dict[str, np.ndarray]]:
  """The first examples of `task` at `lengths` as its objective makes them, before they are cut
  to the lengths (append_eos_after_trim becomes append_eos), from its first source documents."""
  steps = [seqio.preprocessors.append_eos if p is seqio.preprocessors.append_eos_after_trim
           else p for p in task.preprocessors]
  probe = seqio.Task(f"{task.name}_untrimmed", source=task.source,
                     output_features=task.output_features,
                     preprocessors=[lambda ds: ds.take(_LENGTH_PROBE_DOCUMENTS)] + steps)
  ds = probe.get_dataset(sequence_length=dict(lengths), split=split, shuffle=False,
                         num_epochs=1, use_cached=False, trim_output_features=False,
                         try_in_mem_cache=False)
  return list(ds.take(_LENGTH_PROBE_EXAMPLES).as_numpy_iterator())


def check_feature_lengths(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                          split: str = "train") -> None:
  """Reads the first examples of each task at these lengths (before training, as it will make
  them): one warning line if some are cut to the lengths or keep nothing but EOS; a
  SettingError if the task makes no example at all or fails at these lengths."""
  from moe_jax.validation import SettingError  # pylint: disable=import-outside-toplevel
  lengths = {k: int(task_feature_lengths[k]) for k in ("inputs", "targets")}
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  notes = []
  for task in getattr(provider, "tasks", None) or [provider]:
    try:
      with moe_jax.stderr_without(_PIPELINE_ERROR_LOG):  # the error below says it in one line
        examples = _untrimmed_examples(task, lengths, split)
    except tf.errors.OpError as e:  # e.g. a division by zero in the objective
      cause = e.message.strip().splitlines()[0].rsplit(": ", 1)[-1][:200]
      raise SettingError("TASK_FEATURE_LENGTHS", f"task {task.name!r} fails at {lengths}: "
                                                 f"{cause}") from None
    if not examples:
      raise SettingError("TASK_FEATURE_LENGTHS", f"task {task.name!r} makes no example at "
                                                 f"{lengths}: too short for its objective")
    counts = []
    for feature, length in lengths.items():
      sizes = [len(x[feature]) for x in examples if feature in x]
      cut = sum(n > length for n in sizes)
      empty = sum(min(n, length) <= 1 for n in sizes)  # EOS alone
      if cut:
        counts.append(f"{cut} with {feature} cut to {length} (up to {max(sizes)} tokens)")
      if empty:
        counts.append(f"{empty} with empty {feature}")
    if counts:
      notes.append(f"{task.name}: of its first {len(examples)} examples, "
                   f"{', '.join(counts)}")
  if notes:
    logging.warning("TASK_FEATURE_LENGTHS %s are short for the data: %s", lengths,
                    "; ".join(notes))


# ---------------------------------------------------------------------------------------------
# Batches for the trainer


class DatasetIterator(Iterator[dict[str, np.ndarray]]):
  """This process's batches (dicts of numpy int32 arrays) with a JSON-able, restorable position.

  The pipeline is deterministic for a seed, so a position is just the number of batches
  consumed: set_state rebuilds the pipeline and skips that many batches (the skipped batches
  are recomputed, which takes time proportional to the position). The pipeline is built on
  first use, so a set_state right after get_dataset builds it once.
  """

  def __init__(self, build: Callable[[int], tf.data.Dataset], config: dict[str, Any]):
    self._build = build
    self._config = config
    self._consumed = 0
    self._dataset: tf.data.Dataset | None = None
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None

  def _pipeline(self) -> tf.data.Dataset:
    if self._dataset is None:
      self._dataset = self._build(self._consumed)
      self._iterator = self._dataset.as_numpy_iterator()
    return self._dataset

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    """This process's batch shape of each feature (e.g. for model initialisation)."""
    return {k: tuple(v.shape) for k, v in self._pipeline().element_spec.items()}

  def __iter__(self) -> DatasetIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._pipeline()
    batch = next(self._iterator)
    self._consumed += 1
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    """{'batches_consumed': n, ...the pipeline settings the position refers to}."""
    return dict(self._config, batches_consumed=self._consumed)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues exactly after the state's batches_consumed batches."""
    changed = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
    if changed:
      hint = (f"; NUM_DATA_SHARDS={changed['num_shards'][0]} "
              "(run_config.DatasetConfig.num_data_shards) resumes the saved stream"
              if "num_shards" in changed else "")
      raise ValueError(f"dataset state was saved with other settings (saved, now): {changed}"
                       f"{hint}")
    self._consumed = int(state["batches_consumed"])
    self._dataset = self._iterator = None


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                batch_size: int, shuffle: bool = True, seed: int | None = 0,
                process_index: int = 0, process_count: int = 1, num_shards: int | None = None,
                pack: bool = True, num_epochs: int | None = None,
                use_cached: bool = False) -> DatasetIterator:
  """This process's rows of the global batches of a seqio task or mixture (t5x features).

  task_feature_lengths: {'inputs': le, 'targets': ld}. The data is split into num_shards
  shards (default process_count), each giving batch_size / num_shards rows per batch; process
  p reads shards [p*k, (p+1)*k), k = num_shards / process_count, and concatenates their rows.
  The global batch (rows of process 0, then of process 1, ...) is therefore the same for every
  process_count that divides num_shards. Each process gets b = batch_size / process_count rows:
  encoder_input_tokens [b,le], decoder_input_tokens / decoder_target_tokens /
  decoder_loss_weights [b,ld], and with pack=True encoder/decoder_segment_ids and _positions.
  num_epochs None repeats forever (training: an incomplete last batch is dropped); a finite
  pass (eval) pads its last batch with all-zero rows (loss weight 0), so a split smaller than
  one batch is still read.
  """
  try:
    seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(f"unknown mixture_or_task_name {mixture_or_task_name!r}; "
                     f"registered: {', '.join(known)}") from None
  missing = {"inputs", "targets"} - set(task_feature_lengths or {})
  if missing:
    raise ValueError(f"task_feature_lengths needs {sorted(missing)} lengths, got "
                     f"{dict(task_feature_lengths or {})}")
  num_shards = process_count if num_shards is None else num_shards
  if num_shards < 1 or num_shards % process_count:
    raise ValueError(f"num_shards={num_shards} is not a multiple of the process count "
                     f"{process_count}")
  if batch_size % num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  lengths = {k: int(task_feature_lengths[k]) for k in ("inputs", "targets")}
  per_process = num_shards // process_count
  shard_ids = range(process_index * per_process, (process_index + 1) * per_process)

  def shard(shard_id: int) -> tf.data.Dataset:
    ds = seqio.get_mixture_or_task(mixture_or_task_name).get_dataset(
        sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
        # Only pass shard_info when sharding: a TFDS source lists its files to shard them.
        shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
        num_epochs=num_epochs, use_cached=use_cached,
        # seqio would cache a small source in memory after its shuffle, freezing the first
        # epoch's order for all epochs; the sources here are cheap to read again.
        try_in_mem_cache=False)
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, lengths)
    rows = batch_size // num_shards
    if num_epochs is None:
      return ds.batch(rows, drop_remainder=True)
    return ds.batch(rows).map(lambda batch: {  # [<= rows, l] -> [rows, l]
        k: tf.ensure_shape(tf.pad(v, [[0, rows - tf.shape(v)[0]], [0, 0]]), [rows, v.shape[1]])
        for k, v in batch.items()})

  def build(skip_batches: int) -> tf.data.Dataset:
    if per_process == 1:
      ds = shard(shard_ids[0])
    else:  # rows of this process's shards, in shard order
      ds = tf.data.Dataset.zip(tuple(shard(i) for i in shard_ids)).map(
          lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
    return ds.skip(skip_batches).prefetch(tf.data.AUTOTUNE)

  # The position is the same on every process and for every process_count: not part of it.
  config = dict(mixture_or_task_name=mixture_or_task_name, task_feature_lengths=lengths,
                split=split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                num_shards=num_shards, pack=pack, num_epochs=num_epochs, use_cached=use_cached)
  return DatasetIterator(build, config)
