"""The gateway process must never import TensorFlow (~0.5 GB and seconds per process)."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_app_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "create_app(poll_health=False)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras'})\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
