"""Where the repository and the read-only shared material are, for tests and their helper modules, and small slices
of the shared data written as test sources.

A module of its own, not conftest: tests/slurm/ has a conftest too, so `from conftest import ...` would resolve to
whichever conftest pytest imported first.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TOKENIZERS = SHARED / "tokenizers"


def write_alpaca_and_chats(directory: Path, *, alpaca: int, broken_at: int, chats: int) -> tuple[Path, Path]:
    """alpaca.jsonl (the first `alpaca` records of LLaMA-Factory's Alpaca demo, one line each, with a broken JSON line
    inserted at `broken_at`) and chat.json (the first `chats` FastChat conversations, a JSON array) in `directory`."""
    records = json.loads((DATA / "llamafactory/alpaca_en_demo.json").read_text())[:alpaca]
    lines = [json.dumps(record) for record in records]
    lines.insert(broken_at, '{"instruction": "broken", ')
    (directory / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    conversations = json.loads((DATA / "fastchat/dummy_conversation.json").read_text())[:chats]
    (directory / "chat.json").write_text(json.dumps(conversations))
    return directory / "alpaca.jsonl", directory / "chat.json"
