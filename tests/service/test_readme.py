"""The README's SDK example runs as written against a real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import BrokerProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sdk_example_runs(broker_process: BrokerProcess) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    result = subprocess.run(
        [sys.executable, "-c", example],
        env={**os.environ, "GRANT_BROKER_SOCKET": broker_process.socket_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
