"""The data-rich corpora, checked by independent readers: the stdlib walked and read again here,
the multi-domain corpus' structure and labels recovered from its text alone."""
import collections
import pathlib
import sysconfig

import numpy as np
import pytest
import seqio

from moe_jax import corpora, data

LENGTHS = {"inputs": 32, "targets": 8}


@pytest.fixture(scope="module")
def stdlib_files():
  """The stdlib's .py files outside tests and third-party packages, listed independently."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
  files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1])]
  return {str(p): p.read_text(encoding="utf-8") for p in files}


def test_stdlib_documents_cover_the_stdlib_once(stdlib_files):
  train, valid = corpora.stdlib_split("train"), corpora.stdlib_split("validation")
  assert not set(train) & set(valid)
  assert len(set(train)) == len(train) and len(set(valid)) == len(valid)
  assert 0.01 < len(valid) / (len(train) + len(valid)) < 0.04  # ~2% by content hash
  assert sorted(corpora.stdlib_files()) == sorted(stdlib_files)
  # Each document is a piece of one file (up to the blank lines between its blocks); together
  # the documents hold nearly all the source (repeated documents, e.g. licence headers, go).
  squeeze = lambda text: "".join(text.split())
  sources = "\0".join(squeeze(t) for t in stdlib_files.values())
  docs = train + valid
  sample = docs[::max(len(docs) // 300, 1)]
  assert all(squeeze(doc) in sources for doc in sample)
  total = sum(len(t.strip()) for t in stdlib_files.values())
  assert 0.93 < sum(map(len, docs)) / total <= 1.0
  assert np.percentile([len(d) for d in docs], 99) <= 2000  # long blocks are cut at lines
  assert np.median([len(d) for d in docs]) > 500


def test_stdlib_split_source_keeps_blocks_whole():
  blocks = ["import os", "def f(x):\n  y = 1\n\n  return y", "class A:\n  pass"]
  text = "\n\n".join(blocks) + "\n"
  # Each block fits alone but not with the next: one document per top-level block, and the
  # blank line inside f (followed by an indented line) does not split it.
  assert corpora.split_source(text, max_chars=30) == blocks
  assert corpora.split_source(text, max_chars=10_000) == ["\n\n".join(blocks)]
  # A block longer than max_chars is cut at line ends.
  long_block = "x = [\n" + "  1,\n" * 10 + "]"
  pieces = corpora.split_source(long_block, max_chars=20)
  assert len(pieces) == 3 and all(len(p) <= 20 for p in pieces)
  assert "\n".join(pieces).replace("\n\n", "\n") == long_block


def test_stdlib_task_records_the_python_version():
  import platform
  source = seqio.get_mixture_or_task("pystdlib_span_corruption").source
  assert source.python_version == platform.python_version()


def test_stdlib_vocabulary_tokenizes_code_more_compactly():
  with pytest.raises(ValueError, match="pystdlib"):
    data.get_vocabulary(corpus="pystdlib_typo")
  code = data.get_vocabulary(corpus="pystdlib")  # trained on the train split (~30 s), cached
  docs = data.get_vocabulary()
  assert code.sentencepiece_model_file != docs.sentencepiece_model_file
  assert code.vocab_size == docs.vocab_size == 2100
  assert (code.tokenizer.pad_id(), code.eos_id, code.unk_id) == (0, 1, 2)
  held_out = "\n\n".join(corpora.stdlib_split("validation")[:20])
  # A vocabulary fitted to source code needs clearly fewer tokens for unseen source code
  # (CPython 3.11: 0.81x the documentation vocabulary's count).
  assert len(code.encode(held_out)) < 0.9 * len(docs.encode(held_out))


@pytest.fixture(scope="module")
def spec():
  return corpora.MultiDomainSpec(data.multidomain_words(), num_domains=4, successors=6,
                                 validation_documents=200, seed=3)


def _docs(spec, split, n):
  return [corpora.multidomain_document(spec, split, i) for i in range(n)]


def test_multidomain_words_are_single_tokens():
  vocab = data.get_vocabulary()
  words = data.multidomain_words()
  assert len(words) == data.MULTIDOMAIN_NUM_WORDS == len(set(words))
  ids = vocab.encode(" ".join(words))
  assert len(ids) == len(words)


def test_multidomain_structure_and_labels_from_the_text(spec):
  train = _docs(spec, "train", 1500)
  # Known structure: within a domain every word has at most K distinct successors.
  successors = collections.defaultdict(set)
  for text, domain in train:
    words = text.split()
    assert spec.min_words <= len(words) <= spec.max_words
    for a, b in zip(words, words[1:]):
      successors[domain, a].add(b)
  assert max(map(len, successors.values())) <= spec.successors
  labels = [d for _, d in train]
  assert sorted(set(labels)) == list(range(spec.num_domains))
  assert min(np.bincount(labels)) > 0.15 * len(labels)  # uniform over 4 domains
  # Labels are right: a held-out document's bigrams are (almost) all seen in its own domain.
  valid = _docs(spec, "validation", 200)
  right = 0
  for text, domain in valid:
    words = text.split()
    seen = [sum(b in successors[d, a] for a, b in zip(words, words[1:]))
            for d in range(spec.num_domains)]
    right += int(np.argmax(seen)) == domain
  assert right == len(valid)


def test_multidomain_is_deterministic_disjoint_and_shardable(spec):
  again = corpora.MultiDomainSpec(spec.words, num_domains=4, successors=6,
                                  validation_documents=200, seed=3)
  assert _docs(spec, "train", 50) == _docs(again, "train", 50)
  other_seed = corpora.MultiDomainSpec(spec.words, num_domains=4, successors=6, seed=4)
  assert _docs(spec, "train", 20) != _docs(other_seed, "train", 20)
  assert not {t for t, _ in _docs(spec, "validation", 200)} & {t for t, _ in _docs(spec, "train", 3000)}
  source = corpora.MultiDomainSource(spec)
  read = lambda ds: [(ex["text"].decode(), int(ex["domain"])) for ex in ds.as_numpy_iterator()]
  valid = read(source.get_dataset("validation", shuffle=False))
  assert valid == _docs(spec, "validation", 200)
  shards = [read(source.get_dataset("validation", shuffle=False,
                                    shard_info=seqio.ShardInfo(i, 2))) for i in range(2)]
  assert shards[0] == valid[0::2] and shards[1] == valid[1::2]
  first = read(source.get_dataset("train", shuffle=False).take(30))
  assert first == _docs(spec, "train", 30)


@pytest.mark.parametrize("task", ["pystdlib_span_corruption", "multidomain_prefix_lm"])
def test_tasks_give_trainer_batches(task):
  it = data.get_dataset(task, LENGTHS, "train", batch_size=4)
  batch = next(it)
  assert batch["encoder_input_tokens"].shape == (4, 32)
  assert batch["decoder_target_tokens"].shape == (4, 8)
  assert (batch["decoder_target_tokens"] > 0).mean() > 0.9  # packed: almost no padding
  valid = next(data.get_dataset(task, LENGTHS, "validation", batch_size=4, shuffle=False))
  assert valid["encoder_input_tokens"].shape == (4, 32)
