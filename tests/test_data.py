"""moe_jax.data: real seqio tasks end to end, checked by independent NumPy readers of the output."""
import json
import os
import threading

import gin
import numpy as np
import pydoc_data.topics
import pytest
import sentencepiece as spm
import seqio
import tensorflow_datasets as tfds

from moe_jax import data, evaluation, objectives

LENGTHS = {"inputs": 32, "targets": 8}


@gin.configurable
def _gin_task_name(name=gin.REQUIRED):
  """Stands for the trainer's configurable that receives %MIXTURE_OR_TASK_NAME."""
  return name


def _tokenize(vocab, texts):
  """The pipeline's tokenizer (tf_text): python sentencepiece may break score ties differently."""
  return [vocab.encode_tf(t).numpy().tolist() for t in texts]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _examples(task, lengths, split):
  """Task-level examples (before the feature converter), unshuffled, one epoch."""
  ds = seqio.get_mixture_or_task(task).get_dataset(
      sequence_length=lengths, split=split, shuffle=False, seed=0, num_epochs=1)
  return [{k: v for k, v in ex.items() if k in ("inputs", "targets")}
          for ex in ds.as_numpy_iterator()]


def _unmask(inputs, targets, first_sentinel):
  """NumPy reading of one span-corruption example.

  Returns (original tokens, noise span lengths, sentinels of inputs, sentinels of targets).
  Sentinels are ids > first_sentinel - 100; inputs alternate clean run / sentinel, targets
  alternate sentinel / noise run.
  """
  inputs, targets = list(inputs), list(targets)
  assert inputs[-1] == 1 and targets[-1] == 1  # EOS
  inputs, targets = inputs[:-1], targets[:-1]
  is_sentinel = lambda t: t > first_sentinel - 100
  noise = {}
  target_sentinels = []
  for t in targets:
    if is_sentinel(t):
      target_sentinels.append(t)
      noise[t] = []
    else:
      noise[target_sentinels[-1]].append(t)  # targets must start with a sentinel
  original, input_sentinels = [], []
  for t in inputs:
    if is_sentinel(t):
      input_sentinels.append(t)
      original.extend(noise[t])
    else:
      original.append(t)
  return original, [len(noise[s]) for s in input_sentinels], input_sentinels, target_sentinels


def test_corpus_splits_are_disjoint_whole_paragraphs():
  train, valid = data.corpus_split("train"), data.corpus_split("validation")
  assert len(train) > 300 and 10 < len(valid) < 0.1 * len(train)
  assert not set(train) & set(valid) and len(set(train + valid)) == len(train + valid)
  everything = "\n\n".join(pydoc_data.topics.topics.values())
  # Each document is made of whole paragraphs of the docs (check its first and last paragraph).
  for doc in train[::25] + valid:
    paragraphs = doc.split("\n\n")
    assert paragraphs[0] in everything and paragraphs[-1] in everything


def test_vocabulary_t5_conventions():
  vocab = data.get_vocabulary()
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.extra_ids == 100 and vocab.vocab_size == 2100
  assert vocab.encode("<extra_id_0>") == [2099] and vocab.encode("<extra_id_99>") == [2000]
  text = "The assert statement raises an exception when the expression is false."
  ids = vocab.encode(text)
  assert max(ids) < 2000 and 2 not in ids and vocab.decode(ids) == text


def test_vocabulary_is_cached_and_concurrent_first_use_is_safe(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(data.default_sentencepiece_model(1000)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(paths)) == 1 and os.path.dirname(paths[0]) == str(tmp_path)
  assert os.listdir(tmp_path) == [os.path.basename(paths[0])]  # no temp files left behind
  before = os.stat(paths[0])
  vocab = data.get_vocabulary(vocab_size=1000)
  after = os.stat(paths[0])
  assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)  # not retrained
  assert vocab.sentencepiece_model_file == paths[0] and vocab.vocab_size == 1100
  assert spm.SentencePieceProcessor(model_file=paths[0]).get_piece_size() == 1000


def test_random_spans_helper_matches_t5():
  assert objectives.random_spans_helper(512) == (568, 114)  # T5's span corruption lengths
  assert objectives.random_spans_helper(32) == (34, 8)


@pytest.mark.parametrize("length", [2, 3, 10, 34, 100, 568])
def test_noise_mask_structure(length):
  mask = objectives.random_spans_noise_mask(length, 0.15, seeds=[(1, 2), (3, 4)]).numpy()
  num_noise = min(max(int(np.round(length * 0.15)), 1), length - 1)
  starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
  assert mask.shape == (length,) and mask.sum() == num_noise
  assert len(starts) == max(int(np.round(num_noise / 3)), 1)
  assert not mask[0] and mask[-1]  # clean first, noise last, as T5


def test_span_corruption_reconstructs_corpus_with_t5_statistics():
  lengths = {"inputs": 512, "targets": 114}  # T5's pre-training lengths
  tokens_length, _ = objectives.random_spans_helper(512)
  vocab = data.get_vocabulary()
  examples = _examples("pydocs_span_corruption", lengths, "train")
  pieces, noise_spans = [], []
  for ex in examples:
    assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 114
    original, spans, in_sentinels, tgt_sentinels = _unmask(ex["inputs"], ex["targets"], 2099)
    if len(original) >= 2:
      assert in_sentinels == tgt_sentinels == list(range(2099, 2099 - len(spans), -1))
      assert ex["inputs"][0] < 2000 and min(spans) >= 1  # clean first; no empty noise span
      assert sum(spans) == min(max(round(len(original) * 0.15), 1), len(original) - 1)
    else:  # a one-token tail piece: T5 keeps the token and gives the targets a bare sentinel
      assert (in_sentinels, tgt_sentinels) == ([], [2099])
    pieces.append(original)
    noise_spans.extend(spans)
  # No shuffling: the pieces tile the tokenized corpus, concatenated 128 documents at a time.
  stream = [t for ids in _tokenize(vocab, data.corpus_split("train")) for t in ids]
  assert [t for p in pieces for t in p] == stream
  num_groups = -(-len(data.corpus_split("train")) // 128)
  assert sum(len(p) != tokens_length for p in pieces) <= num_groups
  noise_fraction = sum(noise_spans) / len(stream)
  assert abs(noise_fraction - 0.15) < 0.005
  assert abs(np.mean(noise_spans) - 3.0) < 0.1


def test_prefix_lm_reconstructs_documents():
  vocab = data.get_vocabulary()
  examples = _examples("pydocs_prefix_lm", {"inputs": 32, "targets": 32}, "validation")
  expected = []
  for ids in _tokenize(vocab, data.corpus_split("validation")):
    expected += [ids[i:i + 31] for i in range(0, len(ids), 31) if len(ids[i:i + 31]) >= 2]
  got, prefix_fractions = [], []
  for ex in examples:
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    prefix, rest = list(ex["inputs"][:-1]), list(ex["targets"][:-1])
    assert prefix and rest
    got.append(prefix + rest)
    prefix_fractions.append(len(prefix) / len(got[-1]))
  assert got == expected
  assert 0.4 < np.mean(prefix_fractions) < 0.6  # uniform split point


def test_packed_batches_have_t5x_features():
  lengths = {"inputs": 32, "targets": 64}  # room in the decoder to pack prefix LM examples
  it = data.get_dataset("pydocs_prefix_lm", lengths, "train", batch_size=4, seed=1)
  batch = next(it)
  assert set(batch) == {
      "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
      "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
      "encoder_positions", "decoder_positions"}
  assert it.shapes == {k: v.shape for k, v in batch.items()}
  for k, v in batch.items():
    assert v.dtype == np.int32 and v.shape == (4, 64 if "decoder" in k else 32)
  assert batch["encoder_segment_ids"].max() >= 2  # some row holds two examples
  for side, tokens in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
    seg, pos = batch[f"{side}_segment_ids"], batch[f"{side}_positions"]
    np.testing.assert_array_equal(seg > 0, batch[tokens] > 0)
    for row in range(4):
      for j in range(seg.shape[1]):
        start = j == 0 or seg[row, j] != seg[row, j - 1]
        assert pos[row, j] == (0 if start or seg[row, j] == 0 else pos[row, j - 1] + 1)
        if side == "decoder":  # targets shifted right within each segment, 0 at its start
          want = 0 if start or seg[row, j] == 0 else batch[tokens][row, j - 1]
          assert batch["decoder_input_tokens"][row, j] == want
  np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_target_tokens"] > 0)


def test_determinism_and_resume_from_json_state():
  args = (data.DEFAULT_TASK, LENGTHS, "train", 4)
  reference = _take(data.get_dataset(*args, seed=3), 6)
  interrupted = data.get_dataset(*args, seed=3)
  for a, b in zip(reference, _take(interrupted, 2)):  # same seed, same batches
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  state = json.loads(json.dumps(interrupted.get_state()))
  assert state["batches_consumed"] == 2
  resumed = data.get_dataset(*args, seed=3)
  resumed.set_state(state)
  for a, b in zip(reference[2:], _take(resumed, 4)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other_seed = next(data.get_dataset(*args, seed=4))
  assert not np.array_equal(other_seed["encoder_input_tokens"],
                            reference[0]["encoder_input_tokens"])
  with pytest.raises(ValueError, match="seed"):
    resumed.set_state(dict(state, seed=4))


def test_shards_see_disjoint_documents():
  vocab = data.get_vocabulary()
  docs = data.corpus_split("validation")
  lengths = {"inputs": 32, "targets": 32}
  for shard in range(2):
    it = data.get_dataset("pydocs_prefix_lm", lengths, "validation", batch_size=4, shuffle=False,
                          process_index=shard, process_count=2, pack=False, num_epochs=1)
    got = []
    for batch in it:
      assert batch["encoder_input_tokens"].shape == (2, 32)
      for enc, dec in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
        if dec.any():  # not a row padding the pass' last batch
          got.append(list(enc[:list(enc).index(1)]) + list(dec[:list(dec).index(1)]))
    expected = []
    for ids in _tokenize(vocab, docs[shard::2]):  # round-robin over documents
      expected += [ids[i:i + 31] for i in range(0, len(ids), 31) if len(ids[i:i + 31]) >= 2]
    assert got == expected  # one pass reads every example, the last batch's too
  # Shuffled: both hosts draw the same permutation per epoch and keep different halves of it.
  epochs = [_source_epochs(data.PydocsSource().get_dataset(
      "validation", shuffle=True, seed=5, shard_info=seqio.ShardInfo(s, 2)), 2) for s in range(2)]
  for shard0, shard1 in zip(*epochs):
    assert not set(shard0) & set(shard1)
    assert sorted(shard0 + shard1) == sorted(docs)
  assert epochs[0][0] != epochs[0][1]  # a new order each epoch


def test_global_batches_do_not_depend_on_the_process_count():
  """With num_shards fixed, the processes' rows (in process order) make the same global batches
  for 1, 2 or 4 processes: each shard read alone, concatenated in shard order."""
  args = (data.DEFAULT_TASK, LENGTHS, "train", 8)
  shards = [_take(data.get_dataset(*args, seed=2, process_index=i, process_count=4), 3)
            for i in range(4)]
  for count in (1, 2):
    its = [data.get_dataset(*args, seed=2, process_index=p, process_count=count, num_shards=4)
           for p in range(count)]
    state = its[0].get_state()
    assert "process_index" not in state and "process_count" not in state
    batches = [_take(it, 3) for it in its]
    for step in range(3):
      for k in shards[0][step]:
        want = np.concatenate([shard[step][k] for shard in shards])
        got = np.concatenate([b[step][k] for b in batches])
        assert got.shape == (8,) + shards[0][step][k].shape[1:]
        np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="NUM_DATA_SHARDS=4 .* resumes the saved stream"):
    data.get_dataset(*args, seed=2).set_state(state)  # 1 process, default 1 shard
  # A position saved by 2 processes resumes on 1 process (same num_shards).
  resumed = data.get_dataset(*args, seed=2, num_shards=4)
  resumed.set_state(dict(state, batches_consumed=2))
  after = next(resumed)
  for k in after:
    np.testing.assert_array_equal(after[k], np.concatenate([shard[2][k] for shard in shards]))


def _source_epochs(ds, num_epochs):
  """Documents of each epoch of a source, read as plain strings."""
  texts = [x["text"].decode() for x in ds.repeat(num_epochs).as_numpy_iterator()]
  per_epoch = len(texts) // num_epochs
  return [texts[i * per_epoch:(i + 1) * per_epoch] for i in range(num_epochs)]


def test_c4_task_on_tfds_mock_data():
  task = seqio.get_mixture_or_task("c4_v220_span_corruption")
  assert task.source.tfds_dataset.name == data.C4_TFDS_NAME
  with tfds.testing.mock_data(num_examples=64):
    it = data.get_dataset("c4_v220_span_corruption", LENGTHS, "train", batch_size=2,
                          pack=False, num_epochs=1)
    batches = list(it)
  assert len(batches) >= 3
  for batch in batches:
    assert batch["encoder_input_tokens"].shape == (2, 32)
    rows = batch["decoder_target_tokens"].any(1)  # not a row padding the pass' last batch
    np.testing.assert_array_equal(batch["decoder_target_tokens"][rows, 0], 2099)  # 1st sentinel
  assert sum(b["decoder_target_tokens"].any(1).sum() for b in batches[:-1]) == 2 * len(batches[:-1])


def test_text_files_task_and_own_vocabulary_via_gin(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  model = data.default_sentencepiece_model(1000)  # stands for the user's own SentencePiece model
  lines = [" ".join(d.split()) for d in data.corpus_split("validation")]
  (tmp_path / "train.txt").write_text("\n".join(lines[:15]) + "\n")
  (tmp_path / "valid.txt").write_text("\n".join(lines[15:]) + "\n")
  try:
    gin.parse_config(f"""
        import moe_jax.data
        MIXTURE_OR_TASK_NAME = @data.register_text_files_task()
        data.register_text_files_task.name = 'my_text_lines'
        data.register_text_files_task.train_files = '{tmp_path / "train.txt"}'
        data.register_text_files_task.validation_files = ['{tmp_path / "valid.txt"}']
        data.get_vocabulary.sentencepiece_model_file = '{model}'
        _gin_task_name.name = %MIXTURE_OR_TASK_NAME
    """)
    name = _gin_task_name()
    assert name == "my_text_lines"
    assert data.get_vocabulary().sentencepiece_model_file == model
    vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    assert vocab.vocab_size == 1100
    it = data.get_dataset(name, {"inputs": 64, "targets": 14}, "validation", batch_size=2,
                          shuffle=False, pack=False, num_epochs=1)
    batches = list(it)
    stream = [t for ids in _tokenize(vocab, lines[15:]) for t in ids]
    pieces = []
    for batch in batches:
      for enc, dec in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
        enc, dec = list(enc[:list(enc).index(1) + 1]), list(dec[:list(dec).index(1) + 1])
        pieces += _unmask(enc, dec, 1099)[0]
    assert batches and pieces == stream[:len(pieces)]
  finally:
    gin.clear_config()
    seqio.TaskRegistry.remove("my_text_lines")
  assert data.get_vocabulary().vocab_size == 2100  # back to the embedded vocabulary


def test_errors_name_the_setting():
  with pytest.raises(ValueError, match="unknown mixture_or_task_name 'nope'.*pydocs_prefix_lm"):
    data.get_dataset("nope", LENGTHS, "train", 4)
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by num_shards=4"):
    data.get_dataset(data.DEFAULT_TASK, LENGTHS, "train", 6, num_shards=4)
  with pytest.raises(ValueError, match="num_shards=3 is not a multiple of the process count 2"):
    data.get_dataset(data.DEFAULT_TASK, LENGTHS, "train", 6, process_count=2, num_shards=3)
  with pytest.raises(ValueError, match=r"task_feature_lengths needs \['targets'\]"):
    data.get_dataset(data.DEFAULT_TASK, {"inputs": 32}, "train", 4)
  with pytest.raises(ValueError, match="extra_ids=100 sentinels"):
    next(data.get_dataset(data.DEFAULT_TASK, {"inputs": 4096, "targets": 512}, "train", 4))


def test_a_pass_pads_its_last_batch_and_reads_a_split_smaller_than_a_batch(tmp_path):
  # Regression: eval batches dropped an incomplete last batch, so a split with fewer examples
  # than a batch (a small language's validation pages) gave no batch and its eval read 0.000.
  lines = [" ".join(pydoc_data.topics.topics[k].split()[:40]) for k in sorted(
      pydoc_data.topics.topics)[:5]]
  (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
  (tmp_path / "valid.txt").write_text("\n".join(lines[:3]) + "\n")
  task = data.register_text_files_task("tiny_split_prefix_lm", str(tmp_path / "train.txt"),
                                       str(tmp_path / "valid.txt"), objective="prefix_lm")
  lengths = {"inputs": 64, "targets": 64}
  # Reference: seqio's own examples of the split, one pass, unbatched.
  examples = list(seqio.get_mixture_or_task(task).get_dataset(
      lengths, split="validation", shuffle=False, seed=0, num_epochs=1).as_numpy_iterator())
  assert 0 < len(examples) < 16
  batches = list(data.get_dataset(task, lengths, "validation", 16, shuffle=False, pack=False,
                                  num_epochs=1))
  assert len(batches) == 1
  weights = batches[0]["decoder_loss_weights"]
  assert weights.shape == (16, 64)
  assert (weights.sum(1) > 0).sum() == len(examples)
  assert weights.sum() == sum(len(x["targets"]) for x in examples)
  for k, v in batches[0].items():
    assert not v[len(examples):].any(), k  # padding rows are all zero
  # Training (an endless stream) still drops nothing it needs: whole batches only.
  train = data.get_dataset(task, lengths, "train", 16, shuffle=False, pack=False)
  assert next(train)["decoder_loss_weights"].shape == (16, 64)
  # A task with no token at all (an empty split) reads NaN, not a perfect loss of 0.
  empty = evaluation.evaluate_tasks(None, None, {"t": []})
  assert empty["t/num_tokens"] == 0 and np.isnan(empty["t/cross_ent_loss"])
