"""The diversity report of a training mix: per-group counts, lengths, distinct-n and instruction ROUGE-L, top words,
languages, near-duplicate clusters and removals, as one JSON-able dict (`ift data report`, docs/data_quality.md).

Groups: by source and by category (the record's own category, else `balance.instruction_verb`, the heuristic
first verb), optionally by near-duplicate cluster. Counts, lengths and distinct-n cover every record; ROUGE-L and
languages cover a seeded sample (the `--sample` records of lowest `selection_rank`, so the same data and seed give
the same sample whatever the order), top words a larger one (WORD_RECORDS, or --sample if larger).

Tokens (`text_tokens`), for distinct-n and ROUGE-L alike: lower-cased runs of letters and digits, and every CJK
character a token of its own. On ASCII text this is what rouge-score's default tokenizer yields (without stemming);
the default drops every non-ASCII character, which would score Chinese instructions on nothing at all.

Top words: with the optional English tagger `denckring-en-pos` installed (an averaged perceptron trained on UD
English-EWT, no download at run time) the verbs (finite or infinitive), nouns and first verb + following noun of
English instructions, as Self-Instruct's verb-noun chart; always the first words (the heuristic verbs) and the content words (stop words
removed) of English instructions, named as what they are.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ift_dist.data.quality.balance import group_of, instruction_verb, selection_rank
from ift_dist.data.quality.texts import QualityText, Removal, is_cjk

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")
_ENGLISH_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
ROUGE_MAX_TOKENS = 64  # instructions are cut here for ROUGE-L (its LCS: len x len Python steps per pair)
MAX_GROUPS = 20  # groups listed per grouping; the rest are summed under OTHER
OTHER = "(other)"
TOP_WORDS = 25
WORD_RECORDS = 20_000  # instructions whose words are counted (tagging costs ~0.15 ms each)
# English function words, and instruction boilerplate ("given", "following") that says nothing of the topic.
_STOP_TEXT = (
    "a about above after again all also am an and any are as at be been before being below between both "
    "but by can could did do does doing down during each few for from further had has have having he her "
    "here hers him his how i if in into is it its itself just me more most my no nor not now of off on "
    "once only or other our out over own same she should so some such than that the their them then "
    "there these they this those through to too under until up very was we were what when where which "
    "while who whom why will with would you your given following please using use one two three give "
    "make based"
)
STOP_WORDS = frozenset(_STOP_TEXT.split())


def text_tokens(text: str, limit: int | None = None) -> list[str]:
    """Lower-cased word tokens (letters and digits) with every CJK character a token of its own."""
    tokens = _TOKEN.findall(text.lower())
    return tokens[:limit] if limit is not None else tokens


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016) of texts pooled: unique n-grams / all n-grams; 0.0 when there is none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text_tokens(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


class _RougeTokens:
    """rouge-score's tokenizer interface (an object with `tokenize`), on `text_tokens`, cut to `limit` tokens."""

    def __init__(self, limit: int):
        self.limit = limit

    def tokenize(self, text: str) -> list[str]:
        return text_tokens(text, self.limit)


def nearest_rouge_l(texts: Sequence[str], max_tokens: int = ROUGE_MAX_TOKENS) -> list[float]:
    """For each text the highest ROUGE-L F1 (rouge-score, `text_tokens`) against any other text of `texts`; 0.0
    for a lone text. Exact: pairs are tried best bound first and the search stops when the bound cannot beat the
    best found, the bound being F1 with the LCS replaced by the shared token count (LCS <= shared tokens)."""
    import numpy as np
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokens(max_tokens))
    bound_NN = _overlap_bounds([text_tokens(text, max_tokens) for text in texts])
    np.fill_diagonal(bound_NN, -1.0)
    exact: dict[tuple[int, int], float] = {}
    nearest = []
    for i in range(len(texts)):
        best = 0.0
        for j in np.argsort(-bound_NN[i], kind="stable").tolist():
            if bound_NN[i, j] <= best:
                break
            key = (min(i, j), max(i, j))
            if key not in exact:
                exact[key] = scorer.score(texts[key[0]], texts[key[1]])["rougeL"].fmeasure
            best = max(best, exact[key])
        nearest.append(best)
    return nearest


def _overlap_bounds(tokens: Sequence[Sequence[str]]) -> Any:
    """[N, N] upper bounds of ROUGE-L F1: 2 x shared tokens (multiset) / (len_i + len_j), 0 where one is empty.
    Shared counts are sums over k of matrix products of the "token occurs >= k times" indicators."""
    import numpy as np

    vocabulary: dict[str, int] = {}
    rows = [[vocabulary.setdefault(token, len(vocabulary)) for token in row] for row in tokens]
    counts_NV = np.zeros((len(rows), len(vocabulary)), dtype=np.uint8)  # rows are cut to max_tokens (< 256)
    for i, row in enumerate(rows):
        np.add.at(counts_NV[i], row, 1)
    counts_NV = counts_NV[:, (counts_NV > 0).sum(axis=0) >= 2]  # a token in one text only is shared by none
    shared_NN = np.zeros((len(rows), len(rows)), dtype=np.float32)
    for k in range(1, int(counts_NV.max(initial=0)) + 1):
        at_least_NV = (counts_NV >= k).astype(np.float32)
        shared_NN += at_least_NV @ at_least_NV.T
    sizes = np.asarray([len(row) for row in rows], dtype=np.float32)
    total_NN = sizes[:, None] + sizes[None, :]
    return np.divide(2 * shared_NN, total_NN, out=np.zeros_like(shared_NN), where=total_NN > 0)


def detect_languages(texts: Sequence[str]) -> list[str]:
    """langdetect's language of each text (seeded, so repeatable), "unknown" where it finds no letters."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    found = []
    for text in texts:
        try:
            found.append(detect(text[:2000]))
        except LangDetectException:
            found.append("unknown")
    return found


def pos_tagger() -> tuple[Any, str] | None:
    """The optional English part-of-speech tagger (`denckring-en-pos`) and its name, or None if not installed."""
    try:
        from denckring_en_pos import tagger
    except ImportError:
        return None
    return tagger(), f"denckring-en-pos {version('denckring-en-pos')} (averaged perceptron, UD English-EWT)"


def top_words(instructions: Sequence[str], tagger: Any = None) -> dict[str, list[tuple[str, int]]]:
    """Most frequent first words and content words of English instructions; with a tagger also verbs, nouns and
    verb-noun pairs (each instruction's first verb and the first noun after it)."""
    english = [text for text in instructions if not is_cjk(text)]
    first = Counter(instruction_verb(text) for text in english)
    content = Counter(
        word for text in english for word in _ENGLISH_WORD.findall(text.lower()) if word not in STOP_WORDS
    )
    found = {"first_words": first.most_common(TOP_WORDS), "content_words": content.most_common(TOP_WORDS)}
    if tagger is None:
        return found
    verbs, nouns, pairs = Counter(), Counter(), Counter()
    for text in english:
        # The tagger reads a capitalised first word as a proper noun ("Explain" -> PROPN); an instruction's first
        # word is usually an imperative verb, so it is lower-cased.
        tokens = _ENGLISH_WORD.findall(text)[:128]  # the first verb and its noun come early
        if not tokens:
            continue
        labels = [label.partition("|")[::2] for label in tagger.tag([tokens[0].lower(), *tokens[1:]])]
        # A verb here is a finite or infinitive VERB: "following", "given", "using" (participles, gerunds) are
        # instruction boilerplate, not the task.
        tags = [
            ("VERB" if form in ("Fin", "Inf") else "VERB-" + form) if tag == "VERB" else tag
            for tag, form in labels
        ]
        lower = [token.lower() for token in tokens]
        verbs.update(word for word, tag in zip(lower, tags, strict=True) if tag == "VERB")
        nouns.update(word for word, tag in zip(lower, tags, strict=True) if tag == "NOUN")
        verb = next((k for k, tag in enumerate(tags) if tag == "VERB"), None)
        if verb is not None:
            noun = next((k for k in range(verb + 1, len(tags)) if tags[k] == "NOUN"), None)
            pairs[f"{lower[verb]} {lower[noun]}" if noun is not None else lower[verb]] += 1
    found |= {
        "verbs": verbs.most_common(TOP_WORDS),
        "nouns": nouns.most_common(TOP_WORDS),
        "verb_noun": pairs.most_common(TOP_WORDS),
    }
    return found


def _summary(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    if not len(values):
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(array.mean()), 3),
        "median": round(float(np.median(array)), 3),
        "p90": round(float(np.percentile(array, 90)), 3),
        "max": float(array.max()),
    }


def _histograms(metric: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Counts per group over shared log-spaced bin edges (lengths span orders of magnitude)."""
    import numpy as np

    values = np.asarray(metric, dtype=np.float64)
    top = max(float(values.max()) if len(values) else 1.0, 1.0)
    edges = np.unique(np.round(np.geomspace(1, top + 1, 31))).tolist()
    edges = [0.0, *edges] if len(edges) > 1 else [0.0, 1.0, 2.0]
    groups = {}
    for name in dict.fromkeys(names):
        mine = values[[k for k, other in enumerate(names) if other == name]]
        groups[name] = np.histogram(mine, bins=edges)[0].tolist()
    return {"edges": edges, "groups": groups}


def _group_table(
    names: Sequence[str],
    lengths: Mapping[str, Sequence[int]],
    answers: Sequence[str],
    nn: Mapping[int, float],
) -> dict[str, dict[str, Any]]:
    """Per group (the MAX_GROUPS largest; the rest as OTHER): records, share, length summaries, distinct-1/2 of
    the answers, mean nearest-neighbour ROUGE-L of its sampled records."""
    sizes = Counter(names)
    listed = {name for name, _ in sizes.most_common(MAX_GROUPS)}
    members: dict[str, list[int]] = {}
    for k, name in enumerate(names):
        members.setdefault(name if name in listed else OTHER, []).append(k)
    table = {}
    for name, ids in sorted(members.items(), key=lambda item: (item[0] == OTHER, -len(item[1]), item[0])):
        sampled = [nn[k] for k in ids if k in nn]
        table[name] = {
            "records": len(ids),
            "share": round(len(ids) / len(names), 4),
            **{metric: _summary([values[k] for k in ids]) for metric, values in lengths.items()},
            "distinct_1": round(distinct_n([answers[k] for k in ids], 1), 4),
            "distinct_2": round(distinct_n([answers[k] for k in ids], 2), 4),
            "sampled": len(sampled),
            "rouge_l_nn": round(sum(sampled) / len(sampled), 4) if sampled else None,
        }
        if name == OTHER:
            table[name]["groups"] = len(sizes) - len(listed)
    return table


def _token_lengths(texts: Sequence[str], tokenizer: Any) -> list[int]:
    lengths: list[int] = []
    for start in range(0, len(texts), 512):
        batch = tokenizer(list(texts[start : start + 512]), add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) for ids in batch)
    return lengths


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_report(
    texts: Sequence[QualityText],
    *,
    sample: int = 500,
    seed: int = 0,
    tokenizer: Any = None,
    clusters: Sequence[Sequence[str]] | None = None,
    removals: Sequence[Removal] | None = None,
    groupings: Sequence[str] = ("source", "category"),
) -> dict[str, Any]:
    """The report of `texts` (kept records) as a JSON-able dict; see the module docstring. clusters: near-duplicate
    clusters as lists of "source:index" refs (QualityResult.clusters); removals: what the quality stages removed."""
    cluster_of = {ref: number for number, cluster in enumerate(clusters or []) for ref in cluster}
    group_names = {
        by: [group_of(text, by, clusters=cluster_of) for text in texts] for by in {"source", *groupings}
    }
    lengths: dict[str, list[int]] = {
        "prompt_chars": [len(text.prompt) for text in texts],
        "answer_chars": [len(text.answer) for text in texts],
    }
    if tokenizer is not None:
        lengths["prompt_tokens"] = _token_lengths([text.prompt for text in texts], tokenizer)
        lengths["answer_tokens"] = _token_lengths([text.answer for text in texts], tokenizer)
    ranked = sorted(range(len(texts)), key=lambda k: selection_rank(seed, texts[k].ref))
    chosen = sorted(ranked[:sample])  # input order, so the lists below read in the order of the data
    instructions = [texts[k].instruction for k in chosen]
    worded = [texts[k].instruction for k in sorted(ranked[: max(sample, WORD_RECORDS)])]
    nn = dict(zip(chosen, nearest_rouge_l(instructions), strict=True))
    languages = detect_languages([f"{texts[k].prompt}\n{texts[k].answer}" for k in chosen])
    tagged = pos_tagger()
    answers = [text.answer for text in texts]
    report: dict[str, Any] = {
        "records": len(texts),
        "seed": seed,
        "sample": len(chosen),
        "tools": {
            "rouge_score": _package_version("rouge-score"),
            "langdetect": _package_version("langdetect"),
            "pos_tagger": tagged[1] if tagged else None,
            "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        },
        "groupings": {by: _group_table(group_names[by], lengths, answers, nn) for by in groupings},
        "lengths": {metric: _histograms(values, group_names["source"]) for metric, values in lengths.items()},
        "rouge_l": _rouge_section(list(nn.values())),
        "words": {"records": len(worded), **top_words(worded, tagged[0] if tagged else None)},
        "languages": _language_section(languages, [group_names["source"][k] for k in chosen]),
        "clusters": _cluster_section(clusters or [], {str(text.ref): text for text in texts}),
        "removed": _removed_section(removals or []),
    }
    return report


def _rouge_section(nearest: Sequence[float]) -> dict[str, Any]:
    import numpy as np

    edges = [round(0.1 * k, 1) for k in range(11)]
    return {
        "sample": len(nearest),
        "max_tokens": ROUGE_MAX_TOKENS,
        "mean_nn": round(float(np.mean(nearest)), 4) if len(nearest) else None,
        "median_nn": round(float(np.median(nearest)), 4) if len(nearest) else None,
        "above_0.7": sum(value > 0.7 for value in nearest),  # Self-Instruct's bar for "too similar"
        "edges": edges,
        "counts": np.histogram(np.asarray(nearest, dtype=np.float64), bins=edges)[0].tolist(),
    }


def _language_section(languages: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    by_source: dict[str, Counter] = {}
    for language, source in zip(languages, sources, strict=True):
        by_source.setdefault(source, Counter())[language] += 1
    return {
        "sample": len(languages),
        "overall": dict(Counter(languages).most_common()),
        "by_source": {source: dict(counter.most_common()) for source, counter in by_source.items()},
    }


def _cluster_section(clusters: Sequence[Sequence[str]], texts: Mapping[str, QualityText]) -> dict[str, Any]:
    largest = sorted(clusters, key=len, reverse=True)[:MAX_GROUPS]
    return {
        "count": len(clusters),
        "records": sum(len(cluster) for cluster in clusters),
        "size_counts": {str(size): n for size, n in sorted(Counter(len(c) for c in clusters).items())},
        "largest": [
            {
                "size": len(cluster),
                "refs": list(cluster[:5]),
                "instruction": next((texts[ref].instruction[:200] for ref in cluster if ref in texts), None),
            }
            for cluster in largest
        ],
    }


def _removed_section(removals: Sequence[Removal]) -> dict[str, Any]:
    by_source: dict[str, Counter] = {}
    examples: dict[str, list[dict]] = {}
    for removal in removals:
        by_source.setdefault(removal.ref.source, Counter())[removal.reason] += 1
        listed = examples.setdefault(removal.reason, [])
        if len(listed) < 5:
            listed.append(removal.to_json())
    return {
        "total": len(removals),
        "by_reason": dict(Counter(removal.reason for removal in removals).most_common()),
        "by_source": {source: dict(counter.most_common()) for source, counter in by_source.items()},
        "examples": examples,
    }
