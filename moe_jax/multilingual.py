"""Multilingual seqio tasks over the manual-pages corpus (moe_jax/manpages.py), mT5 style.

Languages are sampled with temperature: language L with probability p_L ∝ n_L^α, n_L the
characters of its train split, α = 0.3 (mT5), both for the SentencePiece vocabulary's training
lines and for the task mixture. Registering (`register_manpages`, gin-configurable) adds

  manpages_<language>_<objective>   one task per language (its validation split is that
                                    language's eval task), e.g. manpages_de_span_corruption,
                                    for the languages with >= 20 train pages by default; its
                                    documents are the pages cut at paragraph ends into pieces
                                    of <= 2,000 characters
  manpages_<objective>              the mixture of those tasks with rates p_L

for objective 'span_corruption' or 'prefix_lm'. The tasks use the corpus' own unigram
SentencePiece vocabulary (T5 ids, 100 sentinels), stored next to the corpus. A run binds the
model's vocabulary to the same file:

  MIXTURE_OR_TASK_NAME = @multilingual.register_manpages()
  data.get_vocabulary.sentencepiece_model_file = @multilingual.manpages_vocabulary_file()
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import gin
import numpy as np
import seqio

from moe_jax import corpora, data, manpages

ALPHA = 0.3
VOCAB_SIZE = 8000  # 25 languages, Chinese and Japanese among them: more than pydocs' 2000
SPM_LINES = 100_000  # lines the vocabulary is trained on (data.train_sentencepiece's bound)
MIN_TRAIN_DOCUMENTS = 20  # default language selection: at least this many train pages
# A task's documents: pages cut at paragraph ends into pieces of at most this many characters
# (as the stdlib corpus is), so every part of a long page is read and span corruption does not
# tokenize whole pages (the first batch of a mixture took ~78 s with whole pages).
CHUNK_CHARACTERS = 2000


def temperature_rates(sizes: Mapping[str, float], alpha: float = ALPHA) -> dict[str, float]:
  """{language: p} with p ∝ size^alpha, summing to 1 (alpha 1: proportional, 0: uniform)."""
  if not sizes or min(sizes.values()) <= 0:
    raise ValueError(f"temperature sampling needs positive sizes, got {dict(sizes)}")
  weights = {lang: float(n) ** alpha for lang, n in sizes.items()}
  total = sum(weights.values())
  return {lang: w / total for lang, w in sorted(weights.items())}


def train_sizes(corpus: manpages.Corpus, languages: Sequence[str]) -> dict[str, int]:
  """n_L: characters of each language's train split."""
  return {lang: corpus.sizes["languages"][lang]["characters"]["train"] for lang in languages}


def sample_lines(corpus: manpages.Corpus, languages: Sequence[str], num_lines: int = SPM_LINES,
                 alpha: float = ALPHA, seed: int = 0) -> list[str]:
  """round(num_lines · p_L) non-empty train lines of each language L: without replacement
  while a language has enough lines, with replacement beyond (small languages are repeated,
  as temperature sampling upsamples them). Deterministic for a seed."""
  rates = temperature_rates(train_sizes(corpus, languages), alpha)
  out = []
  for i, lang in enumerate(sorted(languages)):
    lines = [line for doc in corpus.split(lang, "train") for line in doc.splitlines() if line]
    count = int(round(num_lines * rates[lang]))
    rng = np.random.default_rng([seed, i])
    out += [lines[j] for j in rng.choice(len(lines), count, replace=count > len(lines))]
  return out


def _languages(corpus: manpages.Corpus, languages: Sequence[str] | None,
               min_train_documents: int) -> list[str]:
  """The given languages, checked; None: those with documents in both splits and at least
  min_train_documents train documents (a handful of pages would be repeated, not learnt)."""
  usable = corpus.languages
  if languages is None:
    return [lang for lang in usable if len(corpus.split(lang, "train")) >= min_train_documents]
  unknown = sorted(set(languages) - set(usable))
  if unknown:
    raise ValueError(f"languages {unknown} have no documents in both splits of the manpages "
                     f"corpus at {corpus.path}; it has {usable}")
  return sorted(languages)


def _corpus(corpus_dir: str | None) -> manpages.Corpus:
  """The corpus at corpus_dir (a build's directory), default: built (or loaded) in the cache."""
  return manpages.load(corpus_dir) if corpus_dir else manpages.build()


@gin.configurable
def manpages_vocabulary_file(corpus_dir: str | None = None,
                             languages: Sequence[str] | None = None,
                             vocab_size: int = VOCAB_SIZE, alpha: float = ALPHA,
                             num_lines: int = SPM_LINES,
                             min_train_documents: int = MIN_TRAIN_DOCUMENTS) -> str:
  """Path of the corpus' SentencePiece model (trained on first use on sample_lines, then kept
  next to the corpus under a name that hashes its settings)."""
  corpus = _corpus(corpus_dir)
  languages = _languages(corpus, languages, min_train_documents)
  settings = json.dumps([languages, vocab_size, alpha, num_lines], sort_keys=True)
  key = hashlib.sha256(settings.encode()).hexdigest()[:12]
  path = os.path.join(corpus.path, f"spm_unigram_{vocab_size}_{key}.model")
  if not os.path.exists(path):
    data.train_sentencepiece(sample_lines(corpus, languages, num_lines, alpha), vocab_size, path)
  return path


_CHUNKS: dict[tuple[str, str, str], tuple[str, ...]] = {}  # (corpus path, language, split)


def _chunks(corpus: manpages.Corpus, language: str, split: str) -> tuple[str, ...]:
  """A language's documents of a split, each page cut into pieces of <= CHUNK_CHARACTERS
  (computed once per process: seqio asks again for every pass)."""
  key = (corpus.path, language, split)
  if key not in _CHUNKS:
    _CHUNKS[key] = tuple(piece for page in corpus.split(language, split)
                         for piece in corpora.split_source(page, CHUNK_CHARACTERS))
  return _CHUNKS[key]


def task_name(language: str, objective: str, prefix: str = "manpages") -> str:
  return f"{prefix}_{language}_{objective}"


@gin.configurable
def register_manpages(objective: str = "span_corruption", corpus_dir: str | None = None,
                      languages: Sequence[str] | None = None, vocab_size: int = VOCAB_SIZE,
                      alpha: float = ALPHA, num_lines: int = SPM_LINES,
                      min_train_documents: int = MIN_TRAIN_DOCUMENTS,
                      prefix: str = "manpages") -> str:
  """Registers the per-language tasks and their temperature-sampled mixture (see the module
  docstring) and returns the mixture's name. languages None: every language with documents
  in both splits and at least min_train_documents train documents; fewer than 2 languages is
  refused (a mixture of one language is not multilingual)."""
  corpus = _corpus(corpus_dir)
  languages = _languages(corpus, languages, min_train_documents)
  if len(languages) < 2:
    missing = corpus.sizes.get("missing") or manpages.LANGUAGE_PACKAGES
    raise ValueError(f"the manpages corpus at {corpus.path} has {len(languages)} language(s) "
                     f"with train and validation documents, need >= 2; "
                     f"{manpages.missing_line(missing)}")
  path = manpages_vocabulary_file(corpus.path, languages, vocab_size, alpha, num_lines,
                                  min_train_documents)
  vocabulary = data.get_vocabulary(sentencepiece_model_file=path,
                                   extra_ids=data.DEFAULT_EXTRA_IDS)
  rates = temperature_rates(train_sizes(corpus, languages), alpha)
  tasks = []
  for lang in languages:
    source = corpora.DocumentsSource(functools.partial(_chunks, corpus, lang))
    tasks.append((data._add_task(  # noqa: SLF001  data's task recipe, shared
        task_name(lang, objective, prefix), source, data._text_to_targets("text"),  # noqa: SLF001
        objective, vocabulary), rates[lang]))
  mixture = f"{prefix}_{objective}"
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, tasks)
  return mixture
