"""Finds training records that contain an evaluation item (benchmark question or held-out prompt) and names it.

Items (load_eval_items): MMLU/C-Eval/CMMLU rows of every split (question and lettered options, read by
ift_dist.eval.benchmarks), each user turn of a prompt set (ift_dist.eval.prompt_sets), or every string field of 20+
characters of a user JSONL/JSON/CSV file.

ngram method (GPT-3's practice): a record is contaminated when one of its n-grams (cfg.ngram words; for CJK items
cfg.ngram characters, punctuation and spaces left out) is an n-gram of an item. An item shorter than n but of at
least MIN_SHORT_WORDS words (MIN_SHORT_CHARS CJK characters) is one gram of all of it, matched where the record
contains that exact word (character) sequence; shorter items are not matched (a four-word prompt like "Now make it
shorter." is ordinary language, not a leak). Grams are kept as 8-byte hashes in sorted numpy arrays: ~12 bytes per gram.

minhash method: datasketch MinHashLSH over the items' shingle sets; a record is contaminated when an item's
estimated Jaccard similarity to it is >= cfg.threshold (whole-text similarity: an item buried in a long record is
the ngram method's case).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ift_dist.config.quality_schema import DecontamConfig
from ift_dist.data.quality.texts import QualityText, Removal, is_cjk, normalise, shingles, words

MIN_SHORT_WORDS = 6
MIN_SHORT_CHARS = 10  # the same floor for CJK items, in characters
MIN_FIELD_CHARS = 20  # a user file's string fields shorter than this are ids, labels or answers, not prompts
# minhash method: shingle sizes and permutations (those of data.quality.dedup's defaults)
SHINGLE_WORDS, SHINGLE_CHARS, NUM_PERM = 5, 5, 128
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_BASE = np.uint64(0x100000001B3)
BENCHMARK_SPLITS = ("test", "val", "dev")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation text: id names the set, split and row ("mmlu/test/anatomy:12", "mt_bench:81:turn1")."""

    id: str
    text: str


class EvalItemError(ValueError):
    """An evaluation file that cannot be read: the message names file:line."""


def load_eval_items(paths: list[str]) -> list[EvalItem]:
    """The items of every path, in the order given: a directory of benchmark and prompt-set directories (the
    shared eval/), one benchmark directory, a prompt-set file, or a user JSONL/JSON/CSV file."""
    items: list[EvalItem] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            items.extend(_directory_items(path))
        elif path.is_file():
            items.extend(_file_items(path))
        else:
            raise EvalItemError(f"{path}: no such file or directory (data.quality.decontaminate)")
    return items


def _directory_items(path: Path) -> list[EvalItem]:
    from ift_dist.eval.prompt_sets import SET_FILES

    if _is_benchmark_dir(path):
        return _benchmark_items(str(path), path.name)
    items = []
    set_dirs = {Path(file).parent.name: name for name, file in SET_FILES.items()}
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if _is_benchmark_dir(child):
            items.extend(_benchmark_items(str(child), child.name))
        elif child.name in set_dirs and (path / SET_FILES[set_dirs[child.name]]).is_file():
            items.extend(_prompt_set_items(set_dirs[child.name], str(path)))
    if not items:
        raise EvalItemError(
            f"{path}: neither a benchmark directory nor one holding benchmarks or prompt sets"
        )
    return items


def _is_benchmark_dir(path: Path) -> bool:
    return any((path / split).is_dir() and any((path / split).glob("*.csv")) for split in BENCHMARK_SPLITS)


def _benchmark_items(root: str, label: str) -> list[EvalItem]:
    from ift_dist.eval.benchmarks import BenchmarkError, load_questions, open_benchmark
    from ift_dist.eval.records import LETTERS

    try:
        benchmark = open_benchmark(root)
        items = []
        for split in BENCHMARK_SPLITS:
            if not (Path(root) / split).is_dir():
                continue
            for question in load_questions(benchmark, split):
                options = "\n".join(
                    f"{letter}. {c}" for letter, c in zip(LETTERS, question.choices, strict=True)
                )
                subject, _, row = question.id.rpartition("/")
                items.append(EvalItem(f"{label}/{split}/{subject}:{row}", f"{question.question}\n{options}"))
    except BenchmarkError as error:
        raise EvalItemError(str(error)) from error
    return items


def _prompt_set_items(name: str, data_dir: str = "") -> list[EvalItem]:
    from ift_dist.eval.prompt_sets import PromptSetError, load_prompt_set

    try:
        prompts = load_prompt_set(name, data_dir=data_dir)
    except PromptSetError as error:
        raise EvalItemError(str(error)) from error
    items = []
    for prompt in prompts:
        for turn, text in enumerate(prompt.turns, start=1):
            suffix = f":turn{turn}" if len(prompt.turns) > 1 else ""
            items.append(EvalItem(f"{prompt.set}:{prompt.id}{suffix}", text))
    return items


def _file_items(path: Path) -> list[EvalItem]:
    from ift_dist.eval.prompt_sets import SET_FILES

    for name, file in SET_FILES.items():
        if path.resolve().as_posix().endswith("/" + file):
            return _prompt_set_items(name, str(path.resolve().parents[1]))
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                rows = [(reader.line_num, fields) for fields in reader]
            except csv.Error as error:
                raise EvalItemError(f"{path}:{reader.line_num}: {error}") from error
        return [
            EvalItem(f"{path.stem}:{line}:{column}", value)
            for line, fields in rows
            for column, value in enumerate(fields)
            if len(value.strip()) >= MIN_FIELD_CHARS
        ]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvalItemError(f"{path}:{error.lineno}: not JSON: {error.msg}") from None
        located = enumerate(records if isinstance(records, list) else [records])
    else:
        located = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    located.append((line, json.loads(raw)))
                except json.JSONDecodeError as error:
                    raise EvalItemError(f"{path}:{line}: not JSON: {error.msg}") from None
    return [
        EvalItem(f"{path.stem}:{where}:{field}", value)
        for where, record in located
        for field, value in _strings(record, "")
        if len(value.strip()) >= MIN_FIELD_CHARS
    ]


def _strings(value: object, at: str) -> list[tuple[str, str]]:
    """(field path, string) of every string inside a JSON value, in document order."""
    if isinstance(value, str):
        return [(at or "value", value)]
    if isinstance(value, dict):
        return [
            found for key, inner in value.items() for found in _strings(inner, f"{at}.{key}" if at else key)
        ]
    if isinstance(value, list):
        return [found for number, inner in enumerate(value) for found in _strings(inner, f"{at}[{number}]")]
    return []


# ------------------------------------------------------------------------------------------------ matching


@lru_cache(maxsize=1 << 20)
def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def _tokens(text: str, cjk: bool) -> list[str]:
    """Word tokens, or for CJK the characters of the word tokens (punctuation and spaces dropped)."""
    tokens = words(normalise(text))
    return list("".join(tokens)) if cjk else tokens


def _gram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """[len(tokens) - n + 1] uint64 hash of each n-gram: a polynomial over 8-byte token hashes (wrapping)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    token_hashes = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    count = len(tokens) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    for offset in range(n):
        acc = acc * _BASE + token_hashes[offset : offset + count]
    return acc


@dataclass
class _GramIndex:
    """Sorted gram hashes of one gram length and token kind, and the item each came from."""

    hashes: np.ndarray
    items: np.ndarray

    def first_match(self, grams: np.ndarray) -> tuple[int, list[int]] | None:
        """(gram position, item numbers holding that gram, first loaded first) of the record's first gram found."""
        if not len(grams) or not len(self.hashes):
            return None
        where = np.minimum(np.searchsorted(self.hashes, grams), len(self.hashes) - 1)
        hits = np.flatnonzero(self.hashes[where] == grams)
        if not len(hits):
            return None
        end = np.searchsorted(self.hashes, grams[hits[0]], side="right")
        return int(hits[0]), list(dict.fromkeys(self.items[where[hits[0]] : end].tolist()))


class Decontaminator:
    """Matches training records against evaluation items with cfg.method; `match` returns a Removal or None."""

    def __init__(self, items: list[EvalItem], cfg: DecontamConfig):
        self.items = items
        self.cfg = cfg
        self.skipped_short = 0  # items too short to be matched by n-grams
        if str(cfg.method) == "minhash":
            self._build_minhash()
        else:
            self._build_ngrams()

    def _build_ngrams(self) -> None:
        n = self.cfg.ngram
        found: dict[tuple[bool, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for number, item in enumerate(self.items):
            cjk = is_cjk(item.text)
            tokens = _tokens(item.text, cjk)
            if len(tokens) < min(n, MIN_SHORT_CHARS if cjk else MIN_SHORT_WORDS):
                self.skipped_short += 1
                continue
            length = min(n, len(tokens))
            grams = _gram_hashes(tokens, length)
            hashes, owners = found.setdefault((cjk, length), ([], []))
            hashes.append(grams)
            owners.append(np.full(len(grams), number, dtype=np.int32))
        self._index: dict[tuple[bool, int], _GramIndex] = {}
        for key, (hashes, owners) in sorted(found.items()):
            all_hashes, all_owners = np.concatenate(hashes), np.concatenate(owners)
            # stable: among items sharing a gram, the first loaded is named
            order = np.argsort(all_hashes, kind="stable")
            self._index[key] = _GramIndex(all_hashes[order], all_owners[order])

    def _build_minhash(self) -> None:
        from datasketch import MinHashLSH

        self._lsh = MinHashLSH(threshold=self.cfg.threshold, num_perm=NUM_PERM)
        self._minhashes = []
        for number, item in enumerate(self.items):
            minhash = _minhash(item.text)
            self._minhashes.append(minhash)
            if not minhash.is_empty():
                self._lsh.insert(number, minhash, check_duplication=False)

    def match(self, text: QualityText) -> Removal | None:
        """The first evaluation item found in the record's key (cfg.key), or None. detail: the shared n-gram
        (ngram) or the estimated Jaccard similarity (minhash)."""
        key = text.key(str(self.cfg.key))
        if str(self.cfg.method) == "minhash":
            return self._match_minhash(text, key)
        kinds = [False, True] if _CJK_CHAR.search(key) else [False]
        for cjk in kinds:
            tokens = _tokens(key, cjk)
            for (item_cjk, length), index in self._index.items():
                if item_cjk != cjk or len(tokens) < length:
                    continue
                hit = index.first_match(_gram_hashes(tokens, length))
                if hit is not None:
                    # eval sets repeat each other (AlpacaEval holds all of Vicuna-80 and the Self-Instruct
                    # user-oriented set): the first loaded is named, the others are listed
                    position, (number, *others) = hit
                    gram = ("" if cjk else " ").join(tokens[position : position + length])
                    also = f" (also {', '.join(self.items[o].id for o in others)})" if others else ""
                    detail = f"{length}-gram: {gram}{also}"
                    return Removal(text.ref, "contaminated", self.items[number].id, detail)
        return None

    def _match_minhash(self, text: QualityText, key: str) -> Removal | None:
        minhash = _minhash(key)
        if minhash.is_empty():
            return None
        best: tuple[float, int] | None = None
        for number in sorted(self._lsh.query(minhash)):
            similarity = minhash.jaccard(self._minhashes[number])
            if similarity >= self.cfg.threshold - 1e-9 and (best is None or similarity > best[0]):
                best = (similarity, number)
        if best is None:
            return None
        return Removal(text.ref, "contaminated", self.items[best[1]].id, f"jaccard~{best[0]:.3f}")


def _minhash(text: str):  # -> datasketch.MinHash
    from datasketch import MinHash

    minhash = MinHash(num_perm=NUM_PERM)
    grams = shingles(text, word_ngram=SHINGLE_WORDS, char_ngram=SHINGLE_CHARS)
    minhash.update_batch(sorted(gram.encode("utf-8") for gram in grams))
    return minhash
