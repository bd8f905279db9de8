"""Data pipeline throughput, one process, side by side in one run: render + assistant-only labels + packing
(ours) against bare `tokenizer.apply_chat_template` and TRL's dataset preparation with packing.

    python bench/data_throughput.py [--tokenizer DIR] [--max-length 4096] [--repeat 3]

TRL is needed only here (`pip install trl`); without it its row is skipped. Every pipeline starts from the same
in-memory conversations (record reading is timed separately for ours), uses the same tokenizer and chat template,
and reports real tokens produced per second of wall time (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from ift_dist.config import DataConfig, SourceConfig
from ift_dist.data.contracts import RenderedSample
from ift_dist.data.pack import StreamingPacker
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.sources import open_source

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ENGLISH = [
    SourceConfig(path=str(SHARED / "data/llamafactory/alpaca_en_demo.json")),
    SourceConfig(
        path=str(SHARED / "data/llamafactory/identity.json"), placeholders={"name": "Ada", "author": "X"}
    ),
    SourceConfig(path=str(SHARED / "data/llamafactory/glaive_toolcall_en_demo.json")),
    SourceConfig(path=str(SHARED / "data/llamafactory/kto_en_demo.json"), where={"label": True}),
    SourceConfig(path=str(SHARED / "data/fastchat/dummy_conversation.json")),
    SourceConfig(path=str(SHARED / "data/stanford_alpaca/seed_tasks.jsonl")),
]


def load_conversations():
    started = time.perf_counter()
    conversations = []
    for config in ENGLISH:
        source = open_source(config)
        conversations.extend(source.get(int(index)) for index in source.scan().valid_indices)
    return conversations, time.perf_counter() - started


def run_ours(conversations, tokenizer, max_length: int) -> tuple[int, float]:
    renderer = Renderer(tokenizer, DataConfig(max_length=max_length))
    packer = StreamingPacker(max_length, 2000)
    tokens = 0
    started = time.perf_counter()
    for conversation in conversations:
        sample = renderer.render(conversation)
        if isinstance(sample, RenderedSample):
            packer.add(sample)
            while packer.ready:
                tokens += len(packer.pop())
    packer.flush()
    while packer.ready:
        tokens += len(packer.pop())
    return tokens, time.perf_counter() - started


def run_bare(conversations, tokenizer, max_length: int) -> tuple[int, float]:
    tokens = 0
    started = time.perf_counter()
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(
            [message.to_dict() for message in conversation.messages], tools=conversation.tools, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        tokens += min(len(ids), max_length)
    return tokens, time.perf_counter() - started


def run_trl(conversations, tokenizer, max_length: int) -> tuple[int, float, str]:
    """TRL's preparation: datasets.map tokenizing with the chat template (assistant masks where TRL has a training
    template with generation markers for this model), labels, then trl's best-fit-decreasing pack_dataset."""
    from datasets import Dataset
    from trl.chat_template_utils import get_training_chat_template
    from trl.data_utils import pack_dataset

    try:
        template = get_training_chat_template(tokenizer)
        masks, note = True, "assistant-only masks"
    except Exception as error:  # TRL supports a fixed list of templates for assistant-only loss
        template, masks, note = (
            None,
            False,
            f"no assistant masks ({type(error).__name__}: TRL has no training template)",
        )
    rows = [
        # JSON strings: messages with and without tool_calls do not share one Arrow schema.
        {
            "messages": json.dumps([m.to_dict() for m in c.messages]),
            "tools": json.dumps(c.tools) if c.tools else "",
        }
        for c in conversations
    ]
    started = time.perf_counter()
    dataset = Dataset.from_list(rows)

    def tokenize(example):
        tools = json.loads(example["tools"]) if example["tools"] else None
        out = tokenizer.apply_chat_template(
            json.loads(example["messages"]),
            tools=tools,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=masks,
        )
        ids = list(out["input_ids"])
        mask = list(out.get("assistant_masks", [1] * len(ids)))
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]}

    dataset = dataset.map(tokenize, remove_columns=["messages", "tools"])
    packed = pack_dataset(dataset, max_length, strategy="bfd")
    tokens = sum(len(ids) for ids in packed["input_ids"])
    return tokens, time.perf_counter() - started, note


def median_run(function, *args, repeat: int):
    results = [function(*args) for _ in range(repeat)]
    seconds = statistics.median(result[1] for result in results)
    return results[0][0], seconds, results[0][2:] if len(results[0]) > 2 else ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/smollm2-135m-instruct"))
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    conversations, read_seconds = load_conversations()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"# data throughput, {len(conversations)} English conversations, {Path(args.tokenizer).name}, "
        f"max_length {args.max_length}, one process"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, commit {commit}, "
        f"record reading + validation: {len(conversations) / read_seconds:.0f} records/s"
    )
    table = []
    bare_tokens, bare_seconds, _ = median_run(
        run_bare, conversations, tokenizer, args.max_length, repeat=args.repeat
    )
    table.append(("bare apply_chat_template (no labels, no packing)", bare_tokens, bare_seconds, ""))
    ours_tokens, ours_seconds, _ = median_run(
        run_ours, conversations, tokenizer, args.max_length, repeat=args.repeat
    )
    table.append(("ift-dist render + labels + pack", ours_tokens, ours_seconds, ""))
    try:
        trl_tokens, trl_seconds, (note,) = median_run(
            run_trl, conversations, tokenizer, args.max_length, repeat=args.repeat
        )
        table.append(("TRL map(tokenize) + pack_dataset(bfd)", trl_tokens, trl_seconds, note))
    except ImportError:
        trl_seconds = None
        print("# TRL not installed: its row is skipped (pip install trl)")
    ours_rate = ours_tokens / ours_seconds
    print(f"{'pipeline':<52} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} {'ours / it':>9}  note")
    for name, tokens, seconds, note in table:
        rate = tokens / seconds
        print(f"{name:<52} {tokens:>9} {seconds:>8.2f} {rate:>10.0f} {ours_rate / rate:>9.2f}  {note}")


if __name__ == "__main__":
    main()
