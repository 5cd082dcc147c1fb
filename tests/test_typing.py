"""``mypy --strict`` passes on the code that pyproject.toml's [tool.mypy] lists.

The list of packages, the strictness and the handling of the generated
modules live there only, so that ``python -m mypy`` at the root and this test
check the same thing.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_strict_passes() -> None:
    # A subprocess of this interpreter: mypy sees the suite's packages and
    # stubs, and none of pytest's state (its warnings filters, its imports).
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, f"mypy failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
