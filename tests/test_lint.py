"""The lint step: the whole tree is `ruff check`-clean and `ruff format`-formatted at pyproject's one line length."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ruff", reason='ruff is a dev dependency: pip install -e ".[dev]"')


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(command):
    proc = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff {' '.join(command)} found:\n{proc.stdout}{proc.stderr}"
