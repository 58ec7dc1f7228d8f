"""The README's Python example runs as written, and its set-up commands are the ones CI runs."""
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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
