"""A multilingual corpus of natural text: the installed manual pages and their translations.

Debian ships the same manual pages translated into ~25 languages (manpages-de, manpages-fr, ...,
under /usr/share/man/<language>/man<section>/). The corpus holds one document per page and
language: every translated page, and for English (`en`, /usr/share/man/man<section>/) the pages
that have a translation installed, so the corpus is parallel and its English side stays small.

  python -m moe_jax.manpages build [--languages de,fr,ru]

renders the pages once with groff (UTF-8 output, no hyphenation, left-adjusted, one line per
paragraph, no bold or underline overstrike), into $MOE_JAX_CACHE_DIR/manpages/<key>/, where the
key hashes the pages' content and the render settings: documents.jsonl (one JSON object per
document: language, page, split, text) and sizes.json (per language: pages, characters and
documents per split, and what was skipped). Nothing is downloaded: languages whose package is
not installed are named with the apt-get command that adds them.

Rendered text: the running header and footer lines are dropped, every line is stripped and its
inner runs of blanks become one space, consecutive blank lines become one. Alias pages (`.so`
redirections and symbolic links) are skipped: the page they name is rendered under its own name.

Split: a hash of the page's name (`ls.1`) puts ~5% of page names in validation, so a page and
all its translations are on the same side.
"""
from __future__ import annotations

import argparse
import bz2
import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence

MAN_ROOT = "/usr/share/man"
ENGLISH = "en"
VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")
# groff: preprocess tables (-t), input UTF-8 (-K), man/mdoc macros, UTF-8 output, no
# hyphenation (HY=0), left-adjusted (AD=l), lines of 1000 ens so a paragraph is one line, and
# grotty without SGR escapes, bold, overstrike or underline (-P-cbou: plain characters only).
GROFF_ARGS = ("groff", "-t", "-K", "utf-8", "-mandoc", "-Tutf8", "-rHY=0", "-dAD=l",
              "-rLL=1000n", "-P-cbou")
_RENDER_VERSION = 2  # bump when the text cleaning changes: part of the cache key
# Markup a faulty source leaves in groff's output as text (e.g. a translation's `\\fP` or a
# `.RE` glued to the previous line): font escapes, and man(7) macros and common requests at
# the start of a line (the macro goes, its arguments stay).
_LEFT_FONT_ESCAPE = re.compile(r"\\f(\[[^\]]*\]|\(..|[A-Z1-4])")
_LEFT_MACRO = re.compile(r"^(\.(TH|SH|SS|PP|LP|IP|TP|TQ|HP|RS|RE|BI|BR|IB|IR|RB|RI|SM|SB|UR|"
                         r"UE|MT|ME|SY|YS|EX|EE|OP|B|I|P|br|sp|fi|nf|ad|na|ne|ti|bp|hy|nh|TS|TE)"
                         r"(\s+|$))+")
_COMPRESSED = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress,
               ".lzma": lzma.decompress}
# Debian's translated manual pages: language directory -> package.
LANGUAGE_PACKAGES = {
    "cs": "manpages-cs", "da": "manpages-da", "de": "manpages-de", "el": "manpages-el",
    "es": "manpages-es", "fi": "manpages-fi", "fr": "manpages-fr", "hu": "manpages-hu",
    "id": "manpages-id", "it": "manpages-it", "ja": "manpages-ja", "mk": "manpages-mk",
    "nb": "manpages-nb", "nl": "manpages-nl", "pl": "manpages-pl", "pt_BR": "manpages-pt-br",
    "ro": "manpages-ro", "ru": "manpages-ru", "sr": "manpages-sr", "sv": "manpages-sv",
    "tr": "manpages-tr", "uk": "manpages-uk", "vi": "manpages-vi", "zh_CN": "manpages-zh",
    "zh_TW": "manpages-zh",
}


@dataclasses.dataclass(frozen=True)
class Page:
  """One source file. language: 'en' or the directory under the man root ('de', 'pt_BR');
  name: the file name without its compression suffix ('ls.1')."""
  language: str
  name: str
  path: str


def page_name(filename: str) -> str:
  root, ext = os.path.splitext(filename)
  return root if ext in _COMPRESSED else filename


def language_of(directory: str) -> str:
  """'de' for 'de', 'de.UTF-8' or 'de@euro' (older layouts name the encoding or a modifier)."""
  return re.split(r"[.@]", directory, maxsplit=1)[0]


def _section_files(directory: str) -> dict[str, str]:
  """name -> path of the regular files (not links) in directory/man*/ (first by sorted path)."""
  files = {}
  for section in sorted(os.listdir(directory)):
    section_dir = os.path.join(directory, section)
    if not section.startswith("man") or not os.path.isdir(section_dir):
      continue
    for filename in sorted(os.listdir(section_dir)):
      path = os.path.join(section_dir, filename)
      if os.path.isfile(path) and not os.path.islink(path):
        files.setdefault(page_name(filename), path)
  return files


def find_pages(man_root: str = MAN_ROOT, languages: Iterable[str] | None = None,
               names: Iterable[str] | None = None) -> list[Page]:
  """The corpus' source files, sorted by (language, name).

  languages: the translations to read (None: every language directory); English is always
  read, limited to the names that have a translation among them. names: only these pages.
  """
  wanted = None if languages is None else set(languages) - {ENGLISH}
  names = None if names is None else set(names)
  pages: dict[tuple[str, str], str] = {}
  for directory in sorted(os.listdir(man_root)):
    path = os.path.join(man_root, directory)
    language = language_of(directory)
    if directory.startswith("man") or not os.path.isdir(path):
      continue
    if wanted is not None and language not in wanted:
      continue
    for name, file in _section_files(path).items():
      if names is None or name in names:
        pages.setdefault((language, name), file)
  translated = {name for _, name in pages}
  for name, file in _section_files(man_root).items():
    if name in translated:
      pages[(ENGLISH, name)] = file
  return [Page(lang, name, pages[lang, name]) for lang, name in sorted(pages)]


def read_source(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  return _COMPRESSED.get(os.path.splitext(path)[1], lambda b: b)(raw)


def is_alias(source: str) -> bool:
  """A `.so other/page.N` redirection (the page renders under its own name)."""
  lines = [line for line in source.splitlines() if line.strip() and not line.startswith('.\\"')]
  return len(lines) == 1 and lines[0].startswith(".so ")


def clean_render(text: str) -> str:
  """groff's page -> the document: overstrike removed (as `col -b`), running header and footer
  dropped, markup left by faulty sources removed, lines stripped with inner blanks collapsed,
  blank lines collapsed."""
  text = re.sub(r".\x08", "", text)  # X\bX bold and _\bX underline, should any be left
  text = _LEFT_FONT_ESCAPE.sub("", text)
  lines = [_LEFT_MACRO.sub("", " ".join(line.split())) for line in text.splitlines()]
  content = [i for i, line in enumerate(lines) if line]
  if len(content) < 3:
    return ""
  lines = lines[content[0] + 1:content[-1]]  # the header and footer lines
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def render(page: Page) -> str | None:
  """The page's text; None for an alias page or a page that is not UTF-8 or renders empty."""
  try:
    source = read_source(page.path).decode("utf-8")
  except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError):
    return None
  if is_alias(source):
    return None
  env = dict(os.environ, LC_ALL="C.UTF-8")
  out = subprocess.run(GROFF_ARGS, input=source.encode(), capture_output=True, env=env,
                       timeout=120, check=False)
  text = clean_render(out.stdout.decode("utf-8", errors="replace"))
  return text or None


def is_validation(name: str) -> bool:
  """A hash of the page's name, so every translation of a page is on the same side."""
  return int(hashlib.md5(name.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


@functools.cache
def groff_version() -> str:
  if shutil.which("groff") is None:
    raise RuntimeError("groff is not installed (apt-get install groff-base)")
  return subprocess.run(["groff", "--version"], capture_output=True, text=True,
                        check=True).stdout.splitlines()[0]


def corpus_key(pages: Sequence[Page]) -> str:
  """Hash of the pages' names and content and of the render settings."""
  digest = hashlib.sha256(json.dumps([_RENDER_VERSION, GROFF_ARGS, groff_version(),
                                      VALIDATION_PERCENT]).encode())
  for page in pages:
    with open(page.path, "rb") as f:
      digest.update(f"{page.language}\0{page.name}\0".encode() + hashlib.sha256(f.read()).digest())
  return digest.hexdigest()[:16]


def installed_packages(packages: Iterable[str]) -> set[str]:
  """The packages dpkg has installed (empty where there is no dpkg)."""
  if shutil.which("dpkg-query") is None:
    return set()
  out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n",
                        *sorted(set(packages))], capture_output=True, text=True, check=False)
  return {line.split()[0] for line in out.stdout.splitlines() if line.endswith(" installed")}


def missing_languages(languages: Iterable[str] | None = None) -> dict[str, str]:
  """language -> package, for the translations whose Debian package is not installed."""
  wanted = LANGUAGE_PACKAGES if languages is None else {
      lang: LANGUAGE_PACKAGES[lang] for lang in languages if lang in LANGUAGE_PACKAGES}
  installed = installed_packages(wanted.values())
  return {lang: pkg for lang, pkg in wanted.items() if pkg not in installed}


def missing_line(missing: Mapping[str, str]) -> str:
  """One line naming the languages not installed and the command that adds them."""
  packages = " ".join(sorted(set(missing.values())))
  return (f"not installed: {', '.join(sorted(missing))} (add with: apt-get install "
          f"--no-install-recommends {packages})")


def default_dir() -> str:
  from moe_jax import data  # pylint: disable=import-outside-toplevel  (starts TensorFlow)
  return os.path.join(data.cache_dir(), "manpages")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A rendered corpus: documents[(language, split)] = the texts, in page-name order."""
  path: str
  documents: Mapping[tuple[str, str], tuple[str, ...]]
  sizes: Mapping[str, dict]

  @property
  def languages(self) -> list[str]:
    """Languages with documents in both splits (the ones tasks can use)."""
    return sorted(lang for lang, size in self.sizes["languages"].items()
                  if all(size["documents"][split] for split in SPLITS))

  def split(self, language: str, split: str) -> tuple[str, ...]:
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS} for the manpages corpus, got {split!r}")
    return self.documents.get((language, split), ())


def _sizes(records: Sequence[dict], skipped: Mapping[str, collections.Counter]) -> dict:
  """Per language: rendered pages, and documents, characters and UTF-8 bytes per split; the
  pages skipped and why."""
  langs: dict[str, dict] = collections.defaultdict(lambda: {
      "pages": 0, **{k: dict.fromkeys(SPLITS, 0) for k in ("documents", "characters",
                                                            "utf8_bytes")}})
  for r in records:
    size = langs[r["language"]]
    size["pages"] += 1
    size["documents"][r["split"]] += 1
    size["characters"][r["split"]] += len(r["text"])
    size["utf8_bytes"][r["split"]] += len(r["text"].encode())
  for lang, counts in skipped.items():
    langs[lang]["skipped"] = dict(counts)
  return dict(sorted(langs.items()))


def build(man_root: str = MAN_ROOT, out_dir: str | None = None,
          languages: Iterable[str] | None = None, names: Iterable[str] | None = None,
          workers: int = 2, progress: bool = True, force: bool = False) -> Corpus:
  """Renders the pages (see find_pages) into out_dir/<key>/ (default: the cache) and loads
  the result; a corpus already built for the same pages and settings is loaded as it is."""
  pages = find_pages(man_root, languages, names)
  if not any(p.language != ENGLISH for p in pages):
    raise ValueError(f"no translated manual pages under {man_root} for languages={languages}")
  path = os.path.join(out_dir or default_dir(), corpus_key(pages))
  if os.path.exists(os.path.join(path, "sizes.json")) and not force:
    return load(path)
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:  # groff runs outside
    texts = list(tqdm(pool.map(render, pages), total=len(pages), desc="render manpages",
                      unit="page", disable=not progress, file=sys.stderr))
  seconds = time.perf_counter() - start
  records, skipped = [], collections.defaultdict(collections.Counter)
  for page, text in zip(pages, texts):
    if text is None:
      skipped[page.language]["alias, empty or not UTF-8"] += 1
      continue
    records.append({"language": page.language, "page": page.name,
                    "split": "validation" if is_validation(page.name) else "train",
                    "text": text})
  translations = sorted({p.language for p in pages} - {ENGLISH})
  sizes = {"man_root": man_root, "groff": groff_version(), "groff_args": list(GROFF_ARGS),
           "validation_percent": VALIDATION_PERCENT, "render_seconds": round(seconds, 1),
           "missing": missing_languages(None if languages is None else translations),
           "languages": _sizes(records, skipped)}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
  with open(os.path.join(tmp, "documents.jsonl"), "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
  with open(os.path.join(tmp, "sizes.json"), "w", encoding="utf-8") as f:
    json.dump(sizes, f, indent=1, sort_keys=True, ensure_ascii=False)
  if os.path.exists(path):
    shutil.rmtree(path)
  try:
    os.replace(tmp, path)
  except OSError:  # a concurrent build of the same key won: its files are the same
    shutil.rmtree(tmp, ignore_errors=True)
  load.cache_clear()  # a forced build replaced what load may have cached
  return load(path)


@functools.cache
def load(path: str) -> Corpus:
  """A corpus written by build (its directory)."""
  if not os.path.exists(os.path.join(path, "sizes.json")):
    raise FileNotFoundError(f"no manpages corpus at {path} (python -m moe_jax.manpages build)")
  with open(os.path.join(path, "sizes.json"), encoding="utf-8") as f:
    sizes = json.load(f)
  documents = collections.defaultdict(list)
  with open(os.path.join(path, "documents.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      documents[r["language"], r["split"]].append(r["text"])
  return Corpus(path, {k: tuple(v) for k, v in documents.items()}, sizes)


def format_sizes(sizes: Mapping) -> str:
  """A table of the per-language sizes, then the not-installed line."""
  rows = [f"{'language':10} {'pages':>6} {'train docs':>10} {'valid docs':>10} "
          f"{'train chars':>12} {'valid chars':>12}"]
  for lang, s in sizes["languages"].items():
    rows.append(f"{lang:10} {s['pages']:6d} {s['documents']['train']:10d} "
                f"{s['documents']['validation']:10d} {s['characters']['train']:12,d} "
                f"{s['characters']['validation']:12,d}")
  rows.append(f"rendered in {sizes['render_seconds']} s with {sizes['groff']}")
  if sizes["missing"]:
    rows.append(missing_line(sizes["missing"]))
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Render the installed translated manual pages "
                                               "into a multilingual corpus (no download).")
  parser.add_argument("command", choices=["build"])
  parser.add_argument("--languages", default=None,
                      help="comma-separated translations (default: all installed)")
  parser.add_argument("--man_root", default=MAN_ROOT)
  parser.add_argument("--out_dir", default=None, help="default: $MOE_JAX_CACHE_DIR/manpages")
  parser.add_argument("--workers", type=int, default=2, help="concurrent groff processes")
  parser.add_argument("--force", action="store_true", help="render again even if cached")
  args = parser.parse_args(argv)
  languages = args.languages.split(",") if args.languages else None
  if languages:
    unknown = [lang for lang in languages
               if not os.path.isdir(os.path.join(args.man_root, lang))]
    if unknown:
      missing = {lang: LANGUAGE_PACKAGES[lang] for lang in unknown if lang in LANGUAGE_PACKAGES}
      raise SystemExit(f"--languages: no directory under {args.man_root} for "
                       f"{', '.join(unknown)}" + (f"; {missing_line(missing)}" if missing else ""))
  corpus = build(args.man_root, args.out_dir, languages, workers=args.workers,
                 force=args.force)
  print(format_sizes(corpus.sizes))
  print(f"corpus: {corpus.path}")


if __name__ == "__main__":
  main()
