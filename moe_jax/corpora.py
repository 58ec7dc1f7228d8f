"""Data-rich offline corpora: the Python standard library's source, and a synthetic
multi-domain Markov corpus with known structure.

Both exist on any machine with Python and need no download; `data` registers seqio tasks over
them (`pystdlib_*`, `multidomain_*`).

- Standard library: every `.py` file of this interpreter's stdlib outside tests, site-packages
  and IDLE's tests (CPython 3.11: ~730 files, ~12 MB), cut into documents of consecutive
  top-level blocks up to 2 KB. A content hash puts ~2% of documents in the validation split.
  The Python version is part of the source (`python_version`), so results say what they used.
- Multi-domain: D domains over a shared list of words. Domain d has a Zipfian unigram start
  distribution and, for every word, its own K successors with Zipfian probabilities (a sparse
  first-order Markov chain). A document is one domain's chain from a random start. Each
  document is a pure function of (corpus seed, split, index), so the corpus is unlimited,
  deterministic and independent of sharding; every example carries its `domain` label. At
  equal FLOPs the model must store D·W·K transitions: a controlled setting where experts can
  specialise by domain, and where specialisation can be checked against the truth.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

STDLIB_VALIDATION_PERCENT = 2
_STDLIB_MAX_DOC_CHARS = 2000
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                               "__pycache__"})
_SPLITS = ("train", "validation")


# ---------------------------------------------------------------------------------------------
# The standard library's source


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted paths of the stdlib's .py files, tests and third-party packages left out."""
  root = root or stdlib_dir()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  return sorted(paths)


def split_source(text: str, max_chars: int = _STDLIB_MAX_DOC_CHARS) -> list[str]:
  """A source file -> documents: blocks that start at a non-indented line after a blank line,
  joined in order while a document stays within max_chars. A longer block is cut at line ends
  into pieces of at most max_chars (a single longer line stays whole)."""
  blocks = []
  for block in re.split(r"\n\s*\n(?=\S)", text):
    block = block.strip("\n")
    while len(block) > max_chars:
      cut = block.rfind("\n", 0, max_chars + 1)
      cut = cut if cut > 0 else block.find("\n", max_chars)
      if cut < 0:
        break
      blocks.append(block[:cut])
      block = block[cut + 1:]
    if block.strip():
      blocks.append(block)
  docs, current = [], ""
  for block in blocks:
    if current and len(current) + len(block) + 2 > max_chars:
      docs.append(current)
      current = ""
    current = f"{current}\n\n{block}" if current else block
  if current:
    docs.append(current)
  return docs


def _stdlib_is_validation(doc: str) -> bool:
  return int(hashlib.md5(doc.encode()).hexdigest(), 16) % 100 < STDLIB_VALIDATION_PERCENT


@functools.cache
def stdlib_split(split: str) -> tuple[str, ...]:
  """Documents of the stdlib corpus in file order; duplicates kept once (e.g. licence headers).

  Files that are not UTF-8 are skipped (CPython has none outside its tests).
  """
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS} for the stdlib corpus, got {split!r}")
  docs = []
  for path in stdlib_files():
    try:
      with open(path, encoding="utf-8") as f:
        docs += split_source(f.read())
    except UnicodeDecodeError:
      continue
  return tuple(d for d in dict.fromkeys(docs)
               if _stdlib_is_validation(d) == (split == "validation"))


class _SplitsSource(seqio.DataSource):
  """A source of 'train' and 'validation' that shards each split by itself (one shard a split,
  any number of shards: every num_shards-th example)."""

  def __init__(self):
    super().__init__(splits=_SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]


class DocumentsSource(_SplitsSource):
  """A seqio source over a tuple of documents per split: {'text': tf.string}.

  documents: split -> the documents. shuffle=True is a full shuffle with a new permutation each
  epoch (deterministic for a seed); sharding then takes every num_shards-th document of that
  permutation.
  """

  def __init__(self, documents: Callable[[str], Sequence[str]]):
    self._documents = documents
    super().__init__()

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    """sequence_length, use_cached and num_epochs are part of seqio's interface, unused here."""
    del sequence_length, use_cached, num_epochs
    texts = self._documents(split)
    ds = tf.data.Dataset.from_tensor_slices({"text": list(texts)})
    if shuffle:
      ds = ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


class StdlibSource(DocumentsSource):
  """The standard library's source as a seqio source; `python_version` names the interpreter
  whose stdlib it reads."""

  def __init__(self):
    super().__init__(stdlib_split)
    self.python_version = platform.python_version()


# ---------------------------------------------------------------------------------------------
# Synthetic multi-domain Markov corpus


@dataclasses.dataclass(frozen=True)
class MultiDomainSpec:
  """The corpus' structure. words: the shared vocabulary of whole words (text tokens)."""
  words: tuple[str, ...]
  num_domains: int = 8
  successors: int = 8  # K: distinct next words of each word in each domain
  zipf_exponent: float = 1.1
  min_words: int = 48  # document length in words, uniform in [min_words, max_words]
  max_words: int = 160
  validation_documents: int = 2000
  seed: int = 0

  def __post_init__(self):
    if self.num_domains < 1 or not 1 <= self.successors <= len(self.words):
      raise ValueError(f"multi-domain corpus needs num_domains >= 1 and 1 <= successors <= "
                       f"{len(self.words)} words, got {self.num_domains}, {self.successors}")
    if not 2 <= self.min_words <= self.max_words:
      raise ValueError(f"need 2 <= min_words <= max_words, got {self.min_words}, "
                       f"{self.max_words}")


def zipf(n: int, exponent: float) -> np.ndarray:
  """Probabilities of ranks 1..n proportional to rank^-exponent."""
  p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
  return p / p.sum()


@dataclasses.dataclass(frozen=True)
class DomainTables:
  """start [D,W]: start-word probabilities; next [D,W,K]: successor word ids, most likely first;
  next_p [K]: the successors' probabilities (the same Zipf for every word and domain)."""
  start: np.ndarray
  next: np.ndarray
  next_p: np.ndarray


@functools.cache
def domain_tables(spec: MultiDomainSpec) -> DomainTables:
  w, k = len(spec.words), spec.successors
  start, succ = [], []
  for d in range(spec.num_domains):
    rng = np.random.default_rng([spec.seed, d])
    start.append(zipf(w, spec.zipf_exponent)[np.argsort(rng.permutation(w))])
    succ.append(np.stack([rng.choice(w, k, replace=False) for _ in range(w)]))
  return DomainTables(np.stack(start), np.stack(succ), zipf(k, spec.zipf_exponent))


_SPLIT_IDS = {"train": 0, "validation": 1}


def multidomain_document(spec: MultiDomainSpec, split: str, index: int) -> tuple[str, int]:
  """Document `index` of `split`: (text of space-separated words, domain label)."""
  tables = domain_tables(spec)
  rng = np.random.default_rng([spec.seed, 1000 + _SPLIT_IDS[split], index])
  domain = int(rng.integers(spec.num_domains))
  n = int(rng.integers(spec.min_words, spec.max_words + 1))
  ranks = rng.choice(spec.successors, n - 1, p=tables.next_p)
  ids = [int(rng.choice(len(spec.words), p=tables.start[domain]))]
  successors = tables.next[domain]
  for r in ranks:
    ids.append(int(successors[ids[-1], r]))
  return " ".join(spec.words[i] for i in ids), domain


class MultiDomainSource(_SplitsSource):
  """seqio source of the multi-domain corpus: {'text': tf.string, 'domain': tf.int32}.

  spec: the corpus, or a function that makes it when the data is first read (its words may come
  from a vocabulary that is only trained on first use).

  train is unlimited (documents 0, 1, 2, ... in order; num_epochs is ignored); validation holds
  spec.validation_documents documents. Sharding takes every num_shards-th index. shuffle=True
  shuffles within a window of 1024 documents (documents are i.i.d. draws already).
  """

  def __init__(self, spec: MultiDomainSpec | Callable[[], MultiDomainSpec]):
    self._spec = spec
    super().__init__()

  @functools.cached_property
  def spec(self) -> MultiDomainSpec:
    return self._spec if isinstance(self._spec, MultiDomainSpec) else self._spec()

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    stop = self.spec.validation_documents if split == "validation" else np.iinfo(np.int64).max
    ds = tf.data.Dataset.range(stop)
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)

    def generate(index):
      text, domain = multidomain_document(self.spec, split, int(index))
      return text, np.int32(domain)

    def to_features(index):
      text, domain = tf.numpy_function(generate, [index], (tf.string, tf.int32), stateful=False)
      return {"text": tf.ensure_shape(text, []), "domain": tf.ensure_shape(domain, [])}

    ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
      ds = ds.shuffle(1024, seed=seed, reshuffle_each_iteration=True)
    return ds
