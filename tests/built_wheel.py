"""Building the project's wheel for the tests that inspect or install it (tests/ is on sys.path via its conftest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out_dir: Path) -> Path:
    """`pip wheel` of the repository, without dependencies or build isolation, into out_dir; the wheel's path."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out_dir)]
    result = subprocess.run([*command, str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (wheel,) = out_dir.glob("ift_dist-*.whl")
    return wheel
