"""The Colab notebooks run top to bottom in their fast mode and are committed without outputs."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# Executed here; a new notebook must be added (with a fast mode) so it cannot rot unnoticed.
EXECUTED = ("routing_explorer.ipynb", "switch_vs_dense.ipynb")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _notebooks() -> list[pathlib.Path]:
  return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
  """The test process's environment without conftest's 8 simulated devices: a fresh Colab CPU
  runtime has one device, and routing_explorer must set the flag itself before JAX starts.
  TMPDIR keeps the notebooks' temporary run directories under pytest's tmp_path."""
  env = dict(os.environ, MOE_JAX_NOTEBOOK_FAST="1", TMPDIR=str(tmp_path))
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith(DEVICE_FLAG))
  return env


def test_every_notebook_is_executed():
  assert sorted(p.name for p in _notebooks()) == sorted(EXECUTED)


@pytest.mark.parametrize("name", EXECUTED)
def test_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{name}: code cell {i} has outputs"
    assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"


@pytest.mark.parametrize("name", EXECUTED)
def test_install_cell_has_a_source_placeholder(name):
  """Colab: the notebook installs moe_jax from MOE_JAX_SOURCE only when it is not importable."""
  sources = [cell.source for cell in nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
             if cell.cell_type == "code"]
  install = [s for s in sources if "%pip install" in s]
  assert len(install) == 1 and "MOE_JAX_SOURCE =" in install[0]
  assert 'find_spec("moe_jax") is None' in install[0]


def test_routing_explorer_sets_device_flag_before_jax():
  sources = [cell.source for cell in
             nbformat.read(NOTEBOOK_DIR / "routing_explorer.ipynb", as_version=4).cells
             if cell.cell_type == "code"]
  flag = next(i for i, s in enumerate(sources) if DEVICE_FLAG in s)
  first_jax = next(i for i, s in enumerate(sources) if "import jax" in s)
  assert flag < first_jax


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_runs(name, tmp_path):
  """Every cell runs without error (nbclient raises CellExecutionError with the traceback).
  The working directory is a temporary one, as in Colab: gin files must come from the package's
  search paths, not from the current directory."""
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=_kernel_env(tmp_path))
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
