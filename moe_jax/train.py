"""Train from gin files, t5x style.

  python -m moe_jax.train \\
    --gin_file=gin/models/switch_tiny.gin --gin_file=gin/runs/pretrain.gin \\
    --gin.MODEL_DIR=\\"/tmp/run\\" --gin.TRAIN_STEPS=200

Flags (shared by moe_jax.eval and moe_jax.infer):
  --gin_file=F         a gin file (repeatable; later files override earlier ones); relative
                       names are looked up in --gin_search_paths, then the repo's gin/ and the
                       installed package's gin/.
  --gin.NAME=VALUE     a gin binding, e.g. --gin.BATCH_SIZE=16 or
                       --gin.loop.train.stats_period=5;
                       an UPPER_CASE NAME must be a macro some gin file defines.
  --gin_bindings=B     a binding in gin syntax ('NAME = VALUE'), repeatable.
  --gin_search_paths=P comma-separated directories searched for gin files.
  --coordinator_address, --process_count, --process_index: multi-process runs
                       (jax.distributed; default: the MOE_JAX_* environment variables).
  --verbose            show the full traceback of an error (or MOE_JAX_VERBOSE=1).
A bad flag, file, binding or setting prints one line `<prog>: error: <setting>: <problem>` on
stderr and exits with status 2 before anything is compiled (moe_jax/validation.py); a run that
cannot go on (divergence, a failed checkpoint save, a MODEL_DIR in use) prints one line and
exits with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Any, Callable, Sequence

import gin
import jax

from moe_jax import config
from moe_jax import loop
from moe_jax import model_dir as model_dir_lib
from moe_jax import partitioning
from moe_jax import validation
from moe_jax.checkpoints import orbax_utils

_MACRO = re.compile(r"\s*([A-Z][A-Z0-9_]*)\s*=")


class UsageError(Exception):
  """A command-line or gin error, reported as one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse prints usage + message; one line is enough
    raise UsageError(message)


def parse_flags(argv: Sequence[str], prog: str) -> argparse.Namespace:
  """argv (without the program name) -> namespace with gin_files, gin_bindings, ...

  `--gin.NAME=VALUE` (t5x) is rewritten to the binding `NAME = VALUE`.
  """
  parser = _Parser(prog=prog, add_help=True)
  parser.add_argument("--gin_file", action="append", default=[], dest="gin_files")
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--gin_search_paths", default="")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--process_count", type=int, default=None)
  parser.add_argument("--process_index", type=int, default=None)
  parser.add_argument("--verbose", action="store_true")
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise UsageError(f"{arg!r}: expected --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  args = parser.parse_args(rest)
  args.gin_bindings = list(args.gin_bindings) + bindings
  if not args.gin_files:
    raise UsageError("no --gin_file given (e.g. --gin_file=gin/models/switch_tiny.gin "
                     "--gin_file=gin/runs/pretrain.gin)")
  return args


def _search_paths(extra: str) -> list[str]:
  """--gin_search_paths first, then the repo's gin/ and the installed package's gin/."""
  paths = [p for p in extra.split(",") if p]
  return paths + [p for p in config.gin_search_paths() if p not in paths]


def _defined_macros() -> set[str]:
  return {scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"}  # pylint: disable=protected-access


def _default_model_dir(files: Sequence[str]) -> str:
  """./runs/<name of the model gin file> (the first file under a models/ directory)."""
  models = [f for f in files if "models" in os.path.normpath(f).split(os.sep)]
  name = os.path.splitext(os.path.basename((models or files)[0]))[0]
  return os.path.join(".", "runs", name)


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: str = "",
              default_model_dir: bool = False) -> None:
  """t5x semantics: files in order, then bindings, later ones win. Raises UsageError.

  A binding of an UPPER_CASE name must set a macro that some file defines, so a typo such as
  --gin.TRAIN_STEP=10 is an error rather than a silently ignored setting. default_model_dir:
  a MODEL_DIR left None by the files and bindings becomes ./runs/<model gin name>.
  """
  paths = _search_paths(search_paths)
  try:
    config.parse_gin(files, (), paths, finalize=False)
    macros = _defined_macros()
    for binding in bindings:
      match = _MACRO.match(binding)
      if match and match.group(1) not in macros:
        raise UsageError(f"unknown macro {match.group(1)} in binding '{binding.strip()}'; the "
                         f"gin files define: {', '.join(sorted(macros)) or 'none'}")
    bindings = list(bindings)
    if default_model_dir and "MODEL_DIR" in macros:
      config.parse_gin(files, bindings, paths, finalize=False)
      if gin.query_parameter("%MODEL_DIR") is None:
        bindings.append(f"MODEL_DIR = {_default_model_dir(files)!r}")
    config.parse_gin(files, bindings, paths, finalize=True)
  except ValueError as e:  # config.parse_gin's errors are already one line
    required = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(e))
    if required:
      name = required.group(1)
      raise UsageError(f"{name} is required: pass --gin.{name}=...") from None
    raise UsageError(str(e)) from None


def _refuse_busy_model_dir(args: argparse.Namespace, default_model_dir: bool) -> None:
  """RunError if another run on this host holds the local MODEL_DIR, before gin's parse, which
  imports the modules the files name (seconds): MODEL_DIR is read with gin's parser alone
  (config.peek). Single-process runs only: a peer process of the same run may hold it."""
  if any(v is not None for v in (args.coordinator_address, args.process_count,
                                 args.process_index)) or any(
      os.environ.get(v) for v in (partitioning.ENV_COORDINATOR, partitioning.ENV_NUM_PROCESSES,
                                  partitioning.ENV_PROCESS_ID)):
    return
  paths = _search_paths(args.gin_search_paths)
  with contextlib.suppress(KeyError):
    if config.peek(args.gin_files, args.gin_bindings, paths, "initialize_multihost.auto_detect"):
      return
  try:
    model_dir = config.peek(args.gin_files, args.gin_bindings, paths, "MODEL_DIR")
  except KeyError:  # bound to a reference or unparsable: the run's own lock decides
    return
  if model_dir is None and default_model_dir:
    model_dir = _default_model_dir(args.gin_files)
  if isinstance(model_dir, str) and "://" not in model_dir:
    model_dir_lib.check_free(orbax_utils.absolute(model_dir))


def run(entry: Callable[[], Any], argv: Sequence[str] | None, prog: str,
        default_model_dir: bool = False, check_model_dir: bool = False) -> Any:
  """Parse flags and gin, start multi-process JAX if asked, call `entry()` (a gin configurable).

  check_model_dir: refuse a MODEL_DIR that another run holds before parsing gin (entry takes
  the lock itself). Returns entry's result. A usage or setting error prints one line and exits
  with status 2, a validation.RunError one line and status 1; --verbose (or MOE_JAX_VERBOSE=1)
  re-raises them with their traceback.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  verbose = "--verbose" in argv or os.environ.get("MOE_JAX_VERBOSE", "") not in ("", "0")
  try:
    args = parse_flags(argv, prog)
  except UsageError as e:
    _exit(prog, str(e), 2)
  if check_model_dir:
    try:
      _refuse_busy_model_dir(args, default_model_dir)
    except validation.RunError as e:
      if verbose:
        raise
      _exit(prog, str(e), e.exit_status)
  try:
    parse_gin(args.gin_files, args.gin_bindings, args.gin_search_paths, default_model_dir)
  except UsageError as e:
    _exit(prog, str(e), 2)
  partitioning.initialize_multihost(args.coordinator_address, args.process_count,
                                    args.process_index)
  try:
    return entry()
  except (validation.SettingError, validation.RunError) as e:
    if verbose:
      raise
    _exit(prog, str(e).strip().splitlines()[0], e.exit_status)
  except RuntimeError as e:
    if "Required bindings" not in str(e) or verbose:
      raise
    _exit(prog, f"{str(e).strip()} (set them with --gin.NAME=VALUE)", 2)
  except (ValueError, TypeError) as e:
    # A configurable's own check while gin builds entry's arguments or the model (a router or
    # layer setting): gin appends "In call to configurable 'X'" (innermost first), naming it.
    # Raised by the entry itself, it is a bug: the traceback stays.
    where = re.search(r"In call to configurable '([^']+)'", str(e))
    if not where or where.group(1) == getattr(entry, "__name__", None) or verbose:
      raise
    _exit(prog, f"{where.group(1)}: {str(e).strip().splitlines()[0]}", 2)


def _exit(prog: str, message: str, status: int):
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  # Background threads of a failed save may still report to a closed event loop while the
  # interpreter shuts down; the line above already said what happened.
  sys.unraisablehook = lambda unraisable: None
  sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
  summary = run(loop.train, argv, "moe_jax.train", default_model_dir=True,
                check_model_dir=True)
  if jax.process_index() == 0:
    print(loop.format_summary(summary), flush=True)


if __name__ == "__main__":
  main()
