"""The multilingual manual-pages corpus and its tasks, checked by independent readers: the
rendered files read back as JSON, the page's installed path for its language, the letters'
Unicode scripts, man-db's own rendering (`man -l`), dpkg for what is installed, and the
temperature-sampling formula computed here from the documents.

A subset of pages keeps the renders to seconds; the tests skip with the reason when fewer than
2 translated languages are installed (.ci/run installs a few small language packs)."""
import collections
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import unicodedata

import numpy as np
import pytest
import seqio

from moe_jax import data, manpages, multilingual

MAN = "/usr/share/man"
# Translations the tests use when installed (the first 3): small packs with Cyrillic and Greek
# letters first, for the script check.
PREFERRED = ("mk", "el", "ru", "uk", "ro", "de", "fr", "es")
SCRIPTS = {"mk": "CYRILLIC", "ru": "CYRILLIC", "uk": "CYRILLIC", "el": "GREEK"}
COMPRESSED = r"(\.(gz|bz2|xz|lzma))?"


def _names(lang):
  """Page names installed as regular files in one language (English: man<section>/)."""
  root = MAN if lang == "en" else os.path.join(MAN, lang)
  return {re.sub(COMPRESSED + "$", "", os.path.basename(p))
          for p in glob.glob(os.path.join(root, "man*", "*")) if not os.path.islink(p)}


def _translations():
  if not os.path.isdir(MAN) or shutil.which("groff") is None:
    return []
  return [lang for lang in PREFERRED if _names(lang)][:3]


LANGS = _translations()
pytestmark = pytest.mark.skipif(
    len(LANGS) < 2, reason=f"fewer than 2 of the translations {PREFERRED} are installed under "
                           f"{MAN} (apt-get install manpages-mk manpages-ro manpages-el)")


def _is_validation(name):
  return int(hashlib.md5(name.encode()).hexdigest(), 16) % 100 < 5


def _installed(lang, name):
  """Installed files of a page in one language (English: the man<section> directories)."""
  root = MAN if lang == "en" else os.path.join(MAN, lang)
  return [p for p in glob.glob(os.path.join(root, "man*", name + "*"))
          if re.fullmatch(re.escape(name) + COMPRESSED, os.path.basename(p))]


@pytest.fixture(scope="module")
def names():
  """For each test language, 3 train pages and 1 validation page (where it has one) that
  English has too, by the documented rule (md5 of the name)."""
  english = _names("en")
  chosen = set()
  for lang in LANGS:
    have = sorted(_names(lang) & english)
    chosen.update([n for n in have if not _is_validation(n)][:3]
                  + [n for n in have if _is_validation(n)][:1])
  if not any(_is_validation(n) for n in chosen):
    pytest.skip(f"no page of {LANGS} that English has falls in validation")
  return sorted(chosen)


@pytest.fixture(scope="module")
def built(names, tmp_path_factory):
  """Two independent builds of the same pages, and the first one's records read back."""
  dirs = [tmp_path_factory.mktemp(f"build{i}") for i in range(2)]
  corpora = [manpages.build(out_dir=str(d), languages=LANGS, names=names, progress=False,
                            force=True) for d in dirs]
  with open(os.path.join(corpora[0].path, "documents.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return corpora, records


def test_build_is_deterministic(built):
  (a, b), _ = built
  assert os.path.basename(a.path) == os.path.basename(b.path)  # same content key
  for name in ("documents.jsonl",):
    with open(os.path.join(a.path, name), "rb") as fa, open(os.path.join(b.path, name),
                                                            "rb") as fb:
      assert fa.read() == fb.read()


def test_no_markup_left(built):
  _, records = built
  assert records
  for r in records:
    text = r["text"]
    assert "\x08" not in text and "\x1b" not in text, (r["language"], r["page"])
    # roff escapes: fonts, special characters, strings, zero-width and minus escapes (the
    # subset's pages do not document roff itself, where such text is content).
    assert not re.search(r"\\f[BIRP(\[]|\\\(..|\\\*|\\&|\\-|\\e", text), (r["language"],
                                                                         r["page"])
    # man(7) macro and request lines, roff comments.
    assert not re.search(r"(?m)^\.(TH|SH|SS|PP|LP|IP|TP|RS|RE|B|I|BR|IR|BI|RB|fi|nf|br|sp)"
                         r"(\s|$)|^\.\\\"|^'\\\"", text), (r["language"], r["page"])
    assert len(text) > 200


def test_labels_match_the_installed_paths_and_scripts(built, names):
  _, records = built
  seen = {(r["language"], r["page"]) for r in records}
  # Every (language, page) installed as a regular file is in the corpus, and only those.
  expected = {(lang, n) for lang in ["en", *LANGS] for n in names
              if any(not os.path.islink(p) for p in _installed(lang, n))}
  assert seen == expected
  for lang, script in SCRIPTS.items():
    docs = [r["text"] for r in records if r["language"] == lang]
    if not docs:
      continue
    letters = lambda t, s: sum(c.isalpha() and unicodedata.name(c, "").startswith(s) for c in t)
    dominated = [letters(t, script) > letters(t, "LATIN") for t in docs]
    assert sum(dominated) >= 0.75 * len(docs), (lang, dominated)
  for r in records:
    if r["language"] == "en":
      text = r["text"]
      assert sum(c.isascii() for c in text) > 0.98 * len(text), r["page"]


def test_text_equals_man_db_rendering(built):
  """The words of each document, in order, are man -l's words (its own pipeline: preconv,
  tbl, groff, col), header and footer aside."""
  if shutil.which("man") is None:
    pytest.skip("man-db's man is not installed")
  _, records = built
  squeeze = lambda t: re.sub(r"\W", "", t)
  for r in records[::max(len(records) // 6, 1)]:
    path = [p for p in _installed(r["language"], r["page"]) if not os.path.islink(p)][0]
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80")
    out = subprocess.run(["man", "-l", path], capture_output=True, env=env, check=True).stdout
    reference = squeeze(re.sub(r".\x08", "", out.decode()).replace("\u2010", ""))
    assert squeeze(r["text"].replace("\u2010", "")) in reference, (r["language"], r["page"])


def test_splits_are_disjoint_by_page(built, names):
  (corpus, _), records = built
  sides = collections.defaultdict(set)
  for r in records:
    sides[r["page"]].add(r["split"])
  assert all(len(s) == 1 for s in sides.values())  # all translations on one side
  assert {n for n, s in sides.items() if s == {"validation"}} == {
      n for n in names if _is_validation(n)}
  for lang in ["en", *LANGS]:
    train, valid = corpus.split(lang, "train"), corpus.split(lang, "validation")
    assert not set(train) & set(valid)
    for split, part in (("train", train), ("validation", valid)):
      assert sorted(part) == sorted(r["text"] for r in records
                                    if r["language"] == lang and r["split"] == split)
    has_valid = any(_is_validation(r["page"]) for r in records if r["language"] == lang)
    assert bool(valid) == has_valid and (lang in corpus.languages) == (bool(train) and has_valid)
  assert "en" in corpus.languages and len(corpus.languages) >= 2
  with pytest.raises(ValueError, match="split"):
    corpus.split(LANGS[0], "test")


def test_sizes_json_counts_the_documents(built):
  (corpus, _), records = built
  with open(os.path.join(corpus.path, "sizes.json"), encoding="utf-8") as f:
    sizes = json.load(f)
  for lang in ["en", *LANGS]:
    docs = [r for r in records if r["language"] == lang]
    s = sizes["languages"][lang]
    for split in ("train", "validation"):
      part = [r["text"] for r in docs if r["split"] == split]
      assert s["documents"][split] == len(part)
      assert s["characters"][split] == sum(map(len, part))
  assert sizes["render_seconds"] >= 0


def test_missing_languages_agree_with_dpkg():
  if shutil.which("dpkg-query") is None:
    pytest.skip("no dpkg")
  missing = manpages.missing_languages()
  for lang, package in manpages.LANGUAGE_PACKAGES.items():
    status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                            capture_output=True, text=True, check=False).stdout
    assert (lang in missing) == (status != "installed"), (lang, package, status)
  line = manpages.missing_line({"el": "manpages-el", "zh_CN": "manpages-zh"})
  assert "\n" not in line and "el, zh_CN" in line
  assert "apt-get install --no-install-recommends manpages-el manpages-zh" in line


def test_clean_render_drops_overstrike_and_running_lines():
  page = ("LS(1)   User Commands   LS(1)\n\n\n\nN\x08NA\x08AM\x08ME\x08E\n       ls - "
          "_\x08l_\x08i_\x08s_\x08t\n\n\n\nGNU   2022   LS(1)\n")
  assert manpages.clean_render(page) == "NAME\nls - list"
  # Markup a faulty translation leaves as text: a doubled font escape, a macro glued on.
  page = "H(1) x H(1)\n\n-s\\fP list\n.RE\n.I /etc/passwd holds\n.xz files\n\nF 2022 H(1)\n"
  assert manpages.clean_render(page) == "-s list\n\n/etc/passwd holds\n.xz files"


@pytest.fixture(scope="module")
def tasks(built):
  (corpus, _), _ = built
  mixture = multilingual.register_manpages("prefix_lm", corpus_dir=corpus.path,
                                           vocab_size=500, num_lines=4000,
                                           min_train_documents=1, prefix="testman")
  return corpus, mixture


def test_temperature_rates_of_vocabulary_and_mixture(tasks, built):
  corpus, mixture = tasks
  _, records = built
  # Languages with documents in both splits get a task; n_L = their train characters.
  splits = collections.defaultdict(set)
  for r in records:
    splits[r["language"]].add(r["split"])
  chars = collections.Counter()
  for r in records:
    if r["split"] == "train" and len(splits[r["language"]]) == 2:
      chars[r["language"]] += len(r["text"])
  weights = {lang: n ** 0.3 for lang, n in chars.items()}
  expected = {lang: w / sum(weights.values()) for lang, w in weights.items()}
  provider = seqio.get_mixture_or_task(mixture)
  rates = {t.name: provider.get_rate(t) for t in provider.tasks}
  total = sum(rates.values())
  assert sorted(rates) == sorted(f"testman_{lang}_prefix_lm" for lang in chars)
  for lang, p in expected.items():
    assert rates[f"testman_{lang}_prefix_lm"] / total == pytest.approx(p, rel=1e-9)
  # The vocabulary's training lines: round(4000 p_L) lines of each language's train text.
  lines = multilingual.sample_lines(corpus, sorted(chars), 4000)
  train_lines = {lang: {line for r in records if r["language"] == lang and r["split"] == "train"
                        for line in r["text"].splitlines()} for lang in chars}
  assert len(lines) == sum(round(4000 * p) for p in expected.values())
  owners = [{lang for lang in chars if line in train_lines[lang]} for line in lines]
  assert all(owners)
  for lang, p in expected.items():
    # A line some other language has too (e.g. '-h, --help') may have come from either.
    only = sum(o == {lang} for o in owners)
    possible = sum(lang in o for o in owners)
    assert only <= round(4000 * p) <= possible, (lang, only, possible)
    assert only > 0.5 * round(4000 * p)
  # Smaller languages are sampled more than their share of characters.
  smallest = min(chars, key=chars.get)
  assert expected[smallest] > chars[smallest] / sum(chars.values())


def test_tasks_give_each_language_its_own_text(tasks):
  corpus, mixture = tasks
  provider = seqio.get_mixture_or_task(mixture)
  vocab = provider.output_features["targets"].vocabulary
  assert vocab.vocab_size == 600 and (vocab.eos_id, vocab.unk_id) == (1, 2)
  for lang in sorted(set(SCRIPTS) & set(corpus.languages)):
    ds = seqio.get_mixture_or_task(f"testman_{lang}_prefix_lm").get_dataset(
        {"inputs": 64, "targets": 64}, split="validation", shuffle=False)
    text = "".join(vocab.decode(ex["targets"].tolist()) for ex in ds.take(20).as_numpy_iterator())
    assert sum(unicodedata.name(c, "").startswith(SCRIPTS[lang]) for c in text) > 50, lang
  it = data.get_dataset(mixture, {"inputs": 32, "targets": 32}, "train", batch_size=4, seed=0,
                        pack=False)
  batch = next(it)
  assert batch["encoder_input_tokens"].shape == (4, 32)
  assert np.all(batch["decoder_target_tokens"] < 600) and batch["decoder_loss_weights"].sum() > 0


def test_register_refuses_a_single_language(built):
  (corpus, _), _ = built
  with pytest.raises(ValueError, match=r"need >= 2"):
    multilingual.register_manpages(corpus_dir=corpus.path, languages=[LANGS[0]], vocab_size=500,
                                   num_lines=2000, prefix="testman1")
  with pytest.raises(ValueError, match="no documents"):
    multilingual.register_manpages(corpus_dir=corpus.path, languages=["xx", LANGS[0]],
                                   prefix="testman1")


def test_task_documents_are_the_pages_cut_at_paragraph_ends(tasks, built):
  # Every page's text reaches the task, in page order, in pieces of at most 2,000 characters
  # (a long page used to be one document: span corruption tokenized it whole and prefix LM read
  # one random chunk of it per pass). Reference: the records written by the build.
  corpus, _ = tasks
  _, records = built
  for lang in corpus.languages:
    for split in ("train", "validation"):
      ds = seqio.get_mixture_or_task(f"testman_{lang}_prefix_lm").source.get_dataset(
          split, shuffle=False)
      pieces = [x["text"].decode() for x in ds.as_numpy_iterator()]
      pages = sorted((r["page"], r["text"]) for r in records
                     if r["language"] == lang and r["split"] == split)
      assert all(len(p) <= 2000 or "\n" not in p for p in pieces)
      assert "".join("".join(pieces).split()) == "".join("".join(t for _, t in pages).split())
      assert len(pieces) >= len(pages)
      if any(len(t) > 2000 for _, t in pages):
        assert len(pieces) > len(pages)
