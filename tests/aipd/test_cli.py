"""The `aipd` entry itself: what loading it costs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_help_loads_neither_ray_nor_torch() -> None:
    code = (
        "import sys; from aipd.cli import app; "
        "print(','.join(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
