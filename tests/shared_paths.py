"""Where the repository and the read-only shared material are, for tests and their helper modules.

A module of its own, not conftest: tests/slurm/ has a conftest too, so `from conftest import ...` would resolve to
whichever conftest pytest imported first.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TOKENIZERS = SHARED / "tokenizers"
