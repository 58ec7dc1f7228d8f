"""Gin configuration with t5x semantics: gin files found on search paths, later files and
bindings override earlier ones, one-line errors for bad bindings and undefined macros.

Search order: the repository's gin/ (when running from a checkout), then the gin/ tree packaged
inside moe_jax (`moe_jax.gin`, present after a non-editable install). A gin file is named by
path (`gin/models/switch_tiny.gin`), or relative to a search path (`models/switch_tiny.gin`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pathlib
import re
from typing import Any, Sequence

import gin
from gin import config_parser

_REPO_GIN = pathlib.Path(__file__).resolve().parent.parent / "gin"


def gin_search_paths() -> list[str]:
  """Directories searched for gin files and `include`s: repo gin/ first, then moe_jax/gin."""
  paths = []
  if _REPO_GIN.is_dir():
    paths.append(str(_REPO_GIN))
  try:
    spec = importlib.util.find_spec("moe_jax.gin")
  except ModuleNotFoundError:
    spec = None
  for location in (spec.submodule_search_locations or []) if spec else []:
    location = str(pathlib.Path(location).resolve())
    if location not in paths and os.path.isdir(location):
      paths.append(location)
  return paths


def vocabulary_size() -> int:
  """Size of the data's vocabulary (`data.get_vocabulary()` under the gin config in force).

  Model gins bind `VOCAB_SIZE = @config.vocabulary_size()` so the embedding follows the task's
  vocabulary, including a user's `get_vocabulary.sentencepiece_model_file`.
  """
  from moe_jax import data  # pylint: disable=import-outside-toplevel  (imports TensorFlow)
  return data.get_vocabulary().vocab_size


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  """A gin file's path: as given when it exists, else under each search path (a leading 'gin/'
  is dropped, so repo-relative names work after installation too)."""
  if os.path.isfile(name):
    return name
  candidates = [name]
  if name.startswith("gin/"):
    candidates.append(name[len("gin/"):])
  for root in search_paths:
    for candidate in candidates:
      path = os.path.join(root, candidate)
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(f"gin file {name!r} not found (searched {list(search_paths)})")


def _one_line(error: Exception) -> str:
  """Gin's message with its location lines folded into one line."""
  text = str(error).strip()
  missing = re.match(r"No bindings specified for '([^']+)/gin\.macro'", text)
  if missing:
    name = missing.group(1)
    return (f"macro %{name} is used but never defined (define it in a gin file or pass "
            f"--gin.{name}=...)")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return " ".join(lines[:3])


class _Unresolved(config_parser.ParserDelegate):
  """Leaves references (@fn, %MACRO) unresolved: reading a file imports nothing."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _UNRESOLVED

  def macro(self, macro_name):
    return _UNRESOLVED


_UNRESOLVED = object()


def peek(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str],
         name: str) -> Any:
  """The literal value that the files (includes followed) and then the bindings give `name`,
  read with gin's parser alone: nothing is imported, so it takes milliseconds where a parse
  imports every module the files name. name: a macro ('MODEL_DIR') or 'configurable.param'
  (unscoped, any module). KeyError when nothing binds it, its last binding is a reference, or
  a file does not parse (parse_gin reports that)."""
  selector, _, param = name.rpartition(".")
  selector, param = (selector, param) if selector else (name, "")
  found: list[Any] = []

  def read(text: str) -> None:
    for statement in config_parser.ConfigParser(text, _Unresolved()):
      if isinstance(statement, config_parser.IncludeStatement):
        with open(resolve_gin_file(statement.filename, search_paths)) as f:
          read(f.read())
      elif (isinstance(statement, config_parser.BindingStatement) and not statement.scope
            and statement.arg_name == param and (statement.selector == selector or
                                                 statement.selector.endswith("." + selector))):
        found.append(statement.value)
  try:
    for path in gin_files:
      with open(resolve_gin_file(path, search_paths)) as f:
        read(f.read())
    for binding in bindings:
      read(binding)
  except Exception:  # noqa: BLE001  any parse error: the caller's parse_gin reports it
    found.append(_UNRESOLVED)
  if not found or found[-1] is _UNRESOLVED:
    raise KeyError(name)
  return found[-1]


@contextlib.contextmanager
def _quiet_gin_package_lookup():
  """gin tries every include as a Python-package resource before the search paths and logs an
  ERROR ("Path not found") for each miss; the search paths then find the file."""
  def keep(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found:")
  root = logging.getLogger()
  root.addFilter(keep)
  try:
    yield
  finally:
    root.removeFilter(keep)


def parse_gin(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
              search_paths: Sequence[str] | None = None, finalize: bool = True) -> None:
  """Clear the gin config, then parse `gin_files` in order and then `bindings` (each like
  'NUM_EXPERTS = 8' or 'models.T5Config.dropout_rate = 0.1'); later ones override earlier ones.

  Raises ValueError with a one-line message for an unknown file, configurable, parameter or
  module, a syntax error, or a macro that is referenced but never defined. finalize locks the
  config (gin.clear_config unlocks it).
  """
  search_paths = list(gin_search_paths() if search_paths is None else search_paths)
  gin.clear_config()
  # Search paths go before gin's '' (the working directory): for an include that is not a file
  # there, gin tries it as a Python package resource, and a working-directory folder named like
  # the include's first component (./models/, ./runs/) makes that lookup crash.
  prefixes = gin.config._LOCATION_PREFIXES  # noqa: SLF001 (gin has no public API for the order)
  prefixes[:] = list(search_paths) + [p for p in prefixes if p not in search_paths]
  try:
    with _quiet_gin_package_lookup():
      files = [resolve_gin_file(f, search_paths) for f in gin_files]
      gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=finalize)
  except FileNotFoundError as e:
    raise ValueError(f"gin: {e}") from None
  except Exception as e:  # gin raises ValueError, AttributeError, ImportError, SyntaxError...
    raise ValueError(f"gin: {_one_line(e)}") from None


def build_model(gin_files: Sequence[str], bindings: Sequence[str] = (),
                search_paths: Sequence[str] | None = None):
  """The MODEL a model gin defines, e.g. build_model(['models/switch_tiny.gin']): for notebooks,
  benchmarks and scripts that want the model without the trainer. The model is built here, MoE
  layer templates included, and reads no gin afterwards: a later parse or clear leaves it as
  it is. Leaves the gin config parsed (unlocked) so other configurables can still be queried."""
  parse_gin(gin_files, bindings, search_paths, finalize=False)
  try:
    reference = gin.query_parameter("%MODEL")
  except ValueError:
    raise ValueError(f"gin: {list(gin_files)} define no MODEL macro") from None
  return reference.scoped_configurable_fn()
