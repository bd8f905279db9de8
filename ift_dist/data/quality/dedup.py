"""Exact and near-duplicate removal over QualityTexts: the first record in visiting order is kept, every later copy
becomes a Removal naming it.

Exact: a 16-byte blake2b digest of the normalised key per distinct text (never the text itself).

Near: MinHash signatures of each key's shingle set (texts.shingles), computed in `workers` processes in
input-ordered chunks and stored as one uint32 matrix, in RAM or memory-mapped in spill_dir. They are datasketch's
(its 2.x "affine32" scheme: 4 bytes per permutation, half of the legacy uint64) with `shingle_hash` as hashfunc,
computed in numpy from the tokens rather than shingle by shingle: the same values, faster. LSH banding (bands from
the config, or datasketch's optimum for the threshold) is done with numpy sorts over the matrix instead of
MinHashLSH's Python dicts, which grow by ~3 KB per record (bench/dedup_throughput.py measures both). Every candidate
pair is verified by the estimated Jaccard of the two full signatures; in input order, a record verified-similar to
an earlier kept record is dropped for it (the earliest), and a cluster is a kept record with those dropped for it.
"""

from __future__ import annotations

import array
import hashlib
import multiprocessing
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ift_dist.config.quality_schema import DedupConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.texts import _CJK, QualityText, Removal, is_cjk, normalise, shingles, words

# datasketch's default seed: signatures are comparable with datasketch.MinHash(num_perm) built elsewhere.
MINHASH_SEED = 1
# Records per signature task: large enough that a process pays its pickling once per ~0.1 s of work.
CHUNK = 2000
# Within one LSH bucket each record is checked against its first member and at most this many earlier members (all
# pairs in smaller buckets): a bucket of thousands of near-copies costs linear time, not quadratic.
BUCKET_WINDOW = 8
# Pairs whose MinHash estimate is this close to the threshold (about 3 standard errors at 128 permutations) are
# decided by their exact Jaccard.
EXACT_MARGIN = 0.1
# Rows of the signature matrix hashed or compared at a time: bounds the working memory for any corpus size.
ROWS_PER_STEP = 1 << 16
SHINGLES_PER_STEP = 1 << 15  # 16 MiB of permuted hashes at 128 permutations
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MAX32 = np.uint32(0xFFFFFFFF)


@dataclass
class NearDupResult:
    """removals: the records dropped, in input order; clusters: refs of every cluster (>= 2 records), its kept
    record first, clusters in the order of their kept records."""

    removals: list[Removal] = field(default_factory=list)
    clusters: list[list[SampleRef]] = field(default_factory=list)


def exact_duplicates(texts: Iterable[QualityText], cfg: DedupConfig) -> list[Removal]:
    """Records whose normalised key (cfg.key; lower-cased if cfg.lowercase) equals an earlier record's. Memory:
    one 16-byte digest and one SampleRef per distinct text."""
    kept: dict[bytes, SampleRef] = {}
    removals = []
    for text in texts:
        key = normalise(text.key(str(cfg.key)), lowercase=cfg.lowercase)
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        first = kept.setdefault(digest, text.ref)
        if first is not text.ref:
            removals.append(Removal(text.ref, "duplicate", str(first)))
    return removals


def near_duplicates(
    texts: Iterable[QualityText], cfg: DedupConfig, *, workers: int = 1, spill_dir: Path | None = None
) -> NearDupResult:
    """Near-duplicates: in input order, a record whose estimated Jaccard similarity of shingle sets with an earlier
    kept record is >= cfg.threshold is removed for the earliest such record (detail: that estimate); clusters are
    the kept records with those removed for them. Texts without a shingle (empty keys) are left to exact dedup.
    The result does not depend on `workers` (signatures are a function of the text alone).

    Memory per record: 4 * num_perm bytes of signature (512 B at 128; on disk when spill_dir is given), 13 B of
    ref and flags, and, during banding, 8 B per band plus ~24 B per candidate pair (at most 9 per record and band).
    The hashed shingle sets (4 B per distinct shingle) are kept too, for the exact check near the threshold (on disk
    with spill_dir). Measured (bench/dedup_throughput.py, 1M records, each with ~400 near-copies, no spill_dir):
    4 KB per record at the peak, mostly candidate pairs and shingle sets.
    """
    sources: dict[str, int] = {}
    source_of = array.array("i")
    index_of = array.array("q")

    def keys() -> Iterator[str]:
        for text in texts:
            source_of.append(sources.setdefault(text.ref.source, len(sources)))
            index_of.append(text.ref.index)
            yield text.key(str(cfg.key))

    params = (cfg.num_perm, cfg.word_ngram, cfg.char_ngram, cfg.lowercase)
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=spill_dir) if spill_dir is not None else _no_dir() as work:
        signatures, empty, sets = _all_signatures(keys(), params, workers, Path(work) if work else None)
        names = list(sources)

        def ref(position: int) -> SampleRef:
            return SampleRef(names[source_of[position]], index_of[position])

        bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)
        first, second = _candidate_pairs(signatures, empty, bands, rows)
        jaccard = _estimated_jaccard(signatures, first, second)
        # A MinHash estimate is off by ~sqrt(J(1-J)/num_perm) (0.035 at J 0.8 and 128 permutations): a pair whose
        # estimate is within EXACT_MARGIN of the threshold is decided by the exact Jaccard of its shingle sets, so
        # the decision at the threshold is the exact one, at the cost of one set intersection per such pair.
        close = np.flatnonzero(np.abs(jaccard - cfg.threshold) < EXACT_MARGIN)
        for position in close.tolist():
            jaccard[position] = sets.jaccard(int(first[position]), int(second[position]))
        similar = jaccard >= cfg.threshold - 1e-9
        verified = {(int(a), int(b)): j for a, b, j in zip(first[similar], second[similar], jaccard[similar])}
        root = _keep_first(len(empty), first[similar], second[similar])
        members = np.flatnonzero(root != np.arange(len(root)))
        jaccard = np.array(
            [verified.get((int(r), int(m)), np.nan) for r, m in zip(root[members], members, strict=True)]
        )
        del signatures, sets  # closes the memory maps before their directory goes
    removals = [
        Removal(ref(int(m)), "near_duplicate", str(ref(int(root[m]))), f"jaccard {j:.3f}")
        for m, j in zip(members, jaccard, strict=True)
    ]
    clusters: dict[int, list[SampleRef]] = {}
    for member in members.tolist():
        clusters.setdefault(int(root[member]), []).append(ref(member))
    return NearDupResult(removals, [[ref(kept), *rest] for kept, rest in sorted(clusters.items())])


class _no_dir:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, bands: int = 0) -> tuple[int, int]:
    """(bands, rows per band): cfg.bands, or the pair datasketch's optimiser picks for the threshold with false
    negatives weighted 0.95 and false positives 0.05 (16 x 8 at 0.8 and 128 permutations; MinHashLSH's equal
    weights give 9 x 13, which missed ~9% of the near-duplicates at the threshold in the test corpus)."""
    if bands:
        return bands, num_perm // bands
    from datasketch.lsh import _optimal_param

    # False negatives weigh more than false positives: every candidate pair is verified (exactly near the threshold),
    # so an extra candidate costs a comparison, a missed one a duplicate left in the data.
    return _optimal_param(threshold, num_perm, 0.05, 0.95)


@lru_cache(maxsize=1 << 20)
def _piece_hash(piece: str) -> int:
    return int.from_bytes(hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest(), "little")


def _fold(pieces: list[str], n: int) -> np.ndarray:
    """[max(1, len - n + 1)] uint64: a polynomial (wrapping) over the 8-byte hashes of each run of min(n, len)
    pieces; the hash of every shingle of a text without building its string."""
    hashes = np.fromiter((_piece_hash(p) for p in pieces), dtype=np.uint64, count=len(pieces))
    length = min(n, len(pieces))
    count = len(pieces) - length + 1
    acc = np.zeros(count, dtype=np.uint64)
    for offset in range(length):
        acc = acc * _MIX + hashes[offset : offset + count]
    return acc


def shingle_hash(shingle: str) -> int:
    """The 32-bit hash near dedup gives one shingle of texts.shingles: its words (a word shingle has spaces) or
    its characters, folded. As datasketch's `hashfunc`, MinHash(num_perm, seed=1, hashfunc=shingle_hash) over a
    text's shingles gives exactly the signature signatures_of computes (tests/unit/test_quality_dedup.py)."""
    pieces = shingle.split(" ") if " " in shingle else list(shingle)
    return int(_fold(pieces, len(pieces))[0] >> np.uint64(32))


def _shingle_hashes(key: str, word_ngram: int, char_ngram: int, lowercase: bool) -> np.ndarray:
    """uint32 shingle_hash of every shingle of texts.shingles(key), computed from the tokens in numpy."""
    text = normalise(key, lowercase=lowercase)
    # is_cjk counts letters in Python (half the time of this function); without a CJK character it is False anyway
    if _CJK.search(text) and is_cjk(text):
        pieces, n = list("".join(text.split())), char_ngram
    else:
        pieces, n = words(text), word_ngram
        if (
            pieces and min(n, len(pieces)) == 1
        ):  # one-word shingles have no space: shingle_hash folds characters
            found = shingles(key, word_ngram=word_ngram, char_ngram=char_ngram, lowercase=lowercase)
            return np.array([shingle_hash(one) for one in found], dtype=np.uint32)
    if not pieces:
        return np.zeros(0, dtype=np.uint32)
    return (_fold(pieces, n) >> np.uint64(32)).astype(np.uint32)


def shingle_sets(keys: list[str], params: tuple[int, int, int, bool]) -> list[np.ndarray]:
    """Each key's set of shingle hashes (sorted unique uint32): what the exact Jaccard of a pair is computed on."""
    _, word_ngram, char_ngram, lowercase = params
    return [np.unique(_shingle_hashes(key, word_ngram, char_ngram, lowercase)) for key in keys]


def _signatures_and_sets(
    keys: list[str], params: tuple[int, int, int, bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One worker task: signatures, empty flags, and the shingle sets as (concatenated values, sizes)."""
    signatures, empty = signatures_of(keys, params)
    sets = shingle_sets(keys, params)
    values = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint32)
    return signatures, empty, values.astype(np.uint32), np.array([len(x) for x in sets], dtype=np.int64)


def signatures_of(keys: list[str], params: tuple[int, int, int, bool]) -> tuple[np.ndarray, np.ndarray]:
    """([len(keys), num_perm] uint32 MinHash values, [len(keys)] bool: no shingle), equal to datasketch's
    MinHash(num_perm, seed=1, hashfunc=shingle_hash).update_batch(shingles).hashvalues (its "affine32" scheme:
    MurmurHash3 finaliser, then a * h + b mod 2^32), but vectorised over the shingles of many records at once:
    4x datasketch's per-shingle SHA-1 and per-record numpy calls (bench/dedup_throughput.py)."""
    from datasketch import MinHash
    from datasketch.minhash import _fmix

    num_perm, word_ngram, char_ngram, lowercase = params
    a_P, b_P = MinHash(num_perm=num_perm, seed=MINHASH_SEED).permutations
    hashes = [_shingle_hashes(key, word_ngram, char_ngram, lowercase) for key in keys]
    sizes = np.array([len(h) for h in hashes], dtype=np.int64)
    out_KP = np.full((len(keys), num_perm), _MAX32, dtype=np.uint32)
    row = 0
    while row < len(keys):
        # records whose shingles add up to ~SHINGLES_PER_STEP: a [S, num_perm] block at a time
        end = row + 1 + int(np.searchsorted(np.cumsum(sizes[row + 1 :]), SHINGLES_PER_STEP))
        live = [r for r in range(row, end) if sizes[r]]
        if live:
            hv_S = _fmix(np.concatenate([hashes[r] for r in live]), 32)
            permuted_SP = hv_S[:, None] * a_P + b_P
            starts = np.concatenate([[0], np.cumsum(sizes[live])[:-1]])
            out_KP[live] = np.minimum.reduceat(permuted_SP, starts, axis=0)
        row = end
    return out_KP, sizes == 0


def _chunks(keys: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _all_signatures(
    keys: Iterator[str], params: tuple[int, int, int, bool], workers: int, spill: Path | None
) -> tuple[np.ndarray, np.ndarray, _ShingleSets]:
    """Signatures of every key in input order, appended chunk by chunk to a file (spill) or a list. At most two
    chunks per worker are in flight, so the texts are never all in memory at once."""
    num_perm = params[0]
    parts: list[np.ndarray] = []
    set_parts: list[np.ndarray] = []
    empties: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    handle = (spill / "signatures.u32").open("wb") if spill is not None else None
    set_handle = (spill / "shingles.u32").open("wb") if spill is not None else None

    def keep(result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        sig, empty, values, counts = result
        if handle is not None:
            handle.write(sig.tobytes())
            set_handle.write(values.tobytes())
        else:
            parts.append(sig)
            set_parts.append(values)
        empties.append(empty)
        sizes.append(counts)

    if workers <= 1:
        for chunk in _chunks(keys, CHUNK):
            keep(_signatures_and_sets(chunk, params))
    else:
        # spawn, not fork: the caller may be a training process with threads (torch, DeepSpeed, loaders).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pending: deque = deque()
            for chunk in _chunks(keys, CHUNK):
                pending.append(pool.apply_async(_signatures_and_sets, (chunk, params)))
                if len(pending) >= 2 * workers:
                    keep(pending.popleft().get())
            while pending:
                keep(pending.popleft().get())
    empty = np.concatenate(empties) if empties else np.zeros(0, dtype=bool)
    counts = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if handle is not None:
        handle.close()
        set_handle.close()
        if not len(empty):
            return (
                np.zeros((0, num_perm), dtype=np.uint32),
                empty,
                _ShingleSets(np.zeros(0, np.uint32), offsets),
            )
        signatures = np.memmap(
            spill / "signatures.u32", dtype=np.uint32, mode="r", shape=(len(empty), num_perm)
        )
        values = (
            np.memmap(spill / "shingles.u32", dtype=np.uint32, mode="r", shape=(int(offsets[-1]),))
            if offsets[-1]
            else np.zeros(0, np.uint32)
        )
        return signatures, empty, _ShingleSets(values, offsets)
    signatures = np.concatenate(parts) if parts else np.zeros((0, num_perm), dtype=np.uint32)
    values = np.concatenate(set_parts) if set_parts else np.zeros(0, dtype=np.uint32)
    return signatures, empty, _ShingleSets(values, offsets)


@dataclass
class _ShingleSets:
    """Every record's sorted unique shingle hashes, concatenated (in RAM, or memory-mapped from the spill dir)."""

    values: np.ndarray  # uint32
    offsets: np.ndarray  # int64 [N + 1]

    def jaccard(self, first: int, second: int) -> float:
        a = self.values[self.offsets[first] : self.offsets[first + 1]]
        b = self.values[self.offsets[second] : self.offsets[second + 1]]
        common = len(np.intersect1d(a, b, assume_unique=True))
        union = len(a) + len(b) - common
        return common / union if union else 0.0


def _band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[N, bands] uint64: one 64-bit hash of each band's `rows` values (a collision only adds a candidate, which
    verification then rejects)."""
    out_NB = np.empty((len(signatures), bands), dtype=np.uint64)
    for start in range(0, len(signatures), ROWS_PER_STEP):
        block = np.asarray(signatures[start : start + ROWS_PER_STEP], dtype=np.uint64)
        for band in range(bands):
            acc = np.full(len(block), band + 1, dtype=np.uint64)
            for column in range(band * rows, (band + 1) * rows):
                acc = (acc ^ block[:, column]) * _MIX
                acc ^= acc >> np.uint64(29)
            out_NB[start : start + len(block), band] = acc
    return out_NB


def _candidate_pairs(
    signatures: np.ndarray, empty: np.ndarray, bands: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) positions, first < second, of records sharing a band bucket: each record with its bucket's
    first member and up to BUCKET_WINDOW earlier members (sorted unique pairs)."""
    hashes_NB = _band_hashes(signatures, bands, rows)
    live = np.flatnonzero(~empty)
    n = np.int64(len(empty))
    if not len(live):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    codes: np.ndarray = np.zeros(0, dtype=np.int64)
    for band in range(bands):
        values = hashes_NB[live, band]
        order = np.argsort(values, kind="stable")  # stable: a bucket's members stay in input order
        sorted_values, positions = values[order], live[order]
        # every member with its bucket's first (earliest) member, which is usually the one kept ...
        opens = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # where a bucket starts
        first_of = positions[np.flatnonzero(opens)][np.cumsum(opens) - 1]
        later = first_of != positions
        found = [first_of[later] * n + positions[later]]
        # ... and with its BUCKET_WINDOW predecessors
        for distance in range(1, BUCKET_WINDOW + 1):
            same = np.flatnonzero(sorted_values[distance:] == sorted_values[:-distance])
            if not len(same):
                break
            found.append(positions[same] * n + positions[same + distance])
        codes = np.unique(np.concatenate([codes, *found]))
    return codes // n, codes % n


def _estimated_jaccard(signatures: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values of each pair, in blocks of rows."""
    out = np.empty(len(first), dtype=np.float64)
    for start in range(0, len(first), ROWS_PER_STEP):
        a, b = first[start : start + ROWS_PER_STEP], second[start : start + ROWS_PER_STEP]
        out[start : start + len(a)] = (signatures[a] == signatures[b]).mean(axis=1)
    return out


def _keep_first(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[n] the kept position each position is dropped for (itself when kept): visiting positions in input order,
    one is dropped when a verified pair joins it to an earlier kept position (the earliest such). Unlike the
    transitive closure (union-find), a chain a~b~c with a, c far apart cannot drop c for a: in the shared ShareGPT
    demo set, whose template conversations form such chains, the closure dropped records with an exact Jaccard of
    0.55 to the record kept instead."""
    kept_for = np.arange(n, dtype=np.int64)
    dropped = bytearray(n)  # per-element access to a bytearray is several times cheaper than to numpy
    order = np.lexsort((first, second))  # by the later position, then the earlier one
    # Python ints for one block of pairs at a time: a list of every pair would take ~70 B per pair
    for start in range(0, len(order), ROWS_PER_STEP):
        block = order[start : start + ROWS_PER_STEP]
        for earlier, later in zip(first[block].tolist(), second[block].tolist(), strict=True):
            # `earlier` is decided before `later` is reached; the first kept partner wins
            if not dropped[later] and not dropped[earlier]:
                dropped[later] = 1
                kept_for[later] = earlier
    return kept_for
