"""The README's Python example runs as written, its set-up commands are the ones CI runs, it stays
a front door (at most 250 lines), and every relative link in it and in docs/ leads somewhere."""
import collections
import os
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250


def test_layer_example_runs():
  code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
  assert scope["y"].shape == scope["x"].shape
  assert set(scope["losses"]) == {"load_balance_loss", "router_z_loss"}
  assert np.isfinite(float(scope["losses"]["load_balance_loss"]))
  assert 0.0 <= float(scope["metrics"]["fraction_dropped"]) <= 1.0


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  assert len(commands) == 2, "the README gives exactly two set-up commands"
  assert "python -m moe_jax.train" in commands[0]
  assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_door():
  lines = len(README.splitlines())
  assert lines <= MAX_README_LINES, (
      f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/")


def prose_lines(text: str) -> list[str]:
  """The lines of a Markdown text outside fenced code blocks."""
  lines, fence = [], None
  for line in text.splitlines():
    marker = re.match(r"\s*(```|~~~)", line)
    if marker and fence is None:
      fence = marker.group(1)
    elif marker and line.strip().startswith(fence):
      fence = None
    elif fence is None:
      lines.append(line)
  return lines


def github_anchors(text: str) -> set[str]:
  """The fragment ids GitHub gives a Markdown text's headings: the heading's text (links reduced
  to their text) in lower case, every character but letters, digits, '_', '-' and spaces
  dropped, spaces made '-'; a repeated id gets -1, -2, ... appended."""
  anchors, seen = set(), collections.Counter()
  for line in prose_lines(text):
    heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not heading:
      continue
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
    anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    anchors.add(anchor if not seen[anchor] else f"{anchor}-{seen[anchor]}")
    seen[anchor] += 1
  return anchors


def relative_links(text: str) -> list[str]:
  """Targets of the inline links and images outside code that are not URLs (no scheme)."""
  targets = []
  for line in prose_lines(text):
    line = re.sub(r"`[^`]*`", "", line)  # a code span is not a link
    targets += re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", line)
  return [t for t in targets if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_anchors_are_computed_as_github_does():
  text = ("# Mini scale: d_model 256, 4+4 layers\n```\n# not a heading\n```\n"
          "## Initialisation scale 1.0 vs 0.1\n## [Routers](x.md) `at` equal compute\n"
          "## Notes\n## Notes\n")
  assert github_anchors(text) == {"mini-scale-d_model-256-44-layers",
                                  "initialisation-scale-10-vs-01", "routers-at-equal-compute",
                                  "notes", "notes-1"}
  assert relative_links("[a](b.md#c) `[no](link)` [u](https://x.org) ![i](p.png)") == [
      "b.md#c", "p.png"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
  text = document.read_text()
  broken = []
  for target in relative_links(text):
    path, _, fragment = target.partition("#")
    linked = (document.parent / path).resolve() if path else document
    if not linked.exists():
      broken.append(f"{target}: no file {os.path.relpath(linked, ROOT)}")
    elif fragment and linked.suffix == ".md" and fragment not in github_anchors(
        linked.read_text()):
      broken.append(f"{target}: no heading with id #{fragment} in {os.path.relpath(linked, ROOT)}")
  assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)
