"""`ift eval generate|ifeval`: answers to a held-out prompt set on every rank, written once (answers.jsonl, the HTML
page), and for IFEval checked by lm-eval's instruction checkers.

    ift eval generate MODEL_OR_RUN --prompts vicuna_bench|mt_bench|...|FILE [--limit N] [--temperature ...]
    ift eval ifeval MODEL_OR_RUN [--limit N]            generate on IFEval's prompts, then score them
    ift eval ifeval --answers DIR_OR_FILE               score answers generated before

A rerun into the same --out skips the (prompt, sample) pairs answers.jsonl already holds, so an interrupted run goes
on where it stopped; answers generated with other settings (set, sampling) are refused instead of mixed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ift_dist import exit_codes
from ift_dist.eval.answers_file import ANSWERS_FILE, answered_ids, answers_path, append_answers, read_answers

HTML_FILE = "answers.html"
IFEVAL_SET = "ifeval"
# lm-eval's IFEval task decodes greedily up to 1280 new tokens (its ifeval.yaml generation_kwargs).
IFEVAL_MAX_NEW_TOKENS = 1280


class AnswersMismatch(ValueError):
    """An existing answers.jsonl was generated with other settings than this run's."""


def add_generate_arguments(parser: argparse.ArgumentParser, *, ifeval: bool = False) -> None:
    if not ifeval:
        parser.add_argument(
            "--prompts",
            required=True,
            help="mt_bench, vicuna_bench, self_instruct, alpaca_eval, arena_hard, alignbench, ifeval, or a JSONL "
            "file of OpenAI messages / Alpaca records",
        )
    parser.add_argument("--data-dir", default="", help="where the sets are (default: $IFT_EVAL_DATA, else "
                        "../shared/data/eval)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=0, help="the first N prompts (0 = all)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=IFEVAL_MAX_NEW_TOKENS if ifeval else 512, help="per turn"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0 if ifeval else None,
        help="0 = greedy; default: MT-bench's per-category temperatures for mt_bench, greedy otherwise",
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument(
        "--seed", type=int, default=1234, help="with (prompt, sample, turn): every draw's seed"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--system-prompt",
        help="a system prompt for prompts without one ('' = an empty system message, which keeps the template's "
        "default one out, as data.system_prompt does in training); default: the template's own",
    )


def sampling_config(args: argparse.Namespace) -> Any:
    from ift_dist.eval.generate import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def generate_into(
    out: Path, prompt_set: str, args: argparse.Namespace, source: Any, model: Any, tokenizer: Any
) -> list[dict[str, Any]]:
    """Every rank: the answers of `prompt_set` into out/answers.jsonl (what is there already kept), and on rank 0
    generation.json and answers.html. Returns every answer, in prompt order (rank 0; [] elsewhere)."""
    from ift_dist import dist
    from ift_dist.eval.answers_html import write_answers_html
    from ift_dist.eval.generate import (
        GENERATION_FILE,
        chat_template,
        generate_answers,
        write_generation_meta,
    )
    from ift_dist.eval.prompt_sets import load_prompt_set, prompts_file, set_label

    sampling = sampling_config(args)
    prompts = load_prompt_set(prompt_set, data_dir=args.data_dir, limit=args.limit)
    if args.system_prompt is not None:
        prompts = [p if p.system is not None else replace(p, system=args.system_prompt) for p in prompts]
    path = out / ANSWERS_FILE
    done: set[tuple[str, int]] = set()
    if dist.rank() == 0:
        _check_same_settings(out / GENERATION_FILE, set_label(prompt_set), sampling)
        done = answered_ids(read_answers(path))
        write_generation_meta(
            out,
            model_name=source.describe(),
            set_name=set_label(prompt_set),
            prompts_file=prompts_file(prompt_set, args.data_dir),
            chat_template=chat_template(tokenizer),
            sampling=sampling,
            num_samples=args.num_samples,
        )
    done = dist.broadcast_object(done)  # synced generation needs the same work list on every rank
    generate_answers(
        model,
        tokenizer,
        prompts,
        sampling,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        done_ids=done,
        device=dist.device(),
        show_progress=dist.rank() == 0,
        on_batch=(lambda answers: append_answers(path, answers)) if dist.rank() == 0 else None,
        model_name=source.describe(),
    )
    if dist.rank() != 0:
        return []
    records = _in_prompt_order(read_answers(path), prompts)
    _rewrite(path, records)
    meta = json.loads((out / GENERATION_FILE).read_text(encoding="utf-8"))
    write_answers_html(out / HTML_FILE, records, meta)
    return records


def _check_same_settings(meta_path: Path, set_name: str, sampling: Any) -> None:
    from dataclasses import asdict

    if not meta_path.is_file():
        return
    before = json.loads(meta_path.read_text(encoding="utf-8"))
    now = {"set": set_name, "sampling": asdict(sampling)}
    for key, value in now.items():
        if before.get(key) != value:
            raise AnswersMismatch(
                f"{meta_path}: the answers there were generated with {key} {before.get(key)!r}, this run asks "
                f"for {value!r}; give another --out (or remove that directory) instead of mixing them"
            )


def _in_prompt_order(records: list[dict[str, Any]], prompts: list[Any]) -> list[dict[str, Any]]:
    """The answers sorted by prompt then sample (a resumed run with another --limit appends out of order); answers
    of prompts not in this run's set stay, after the others."""
    order = {prompt.id: index for index, prompt in enumerate(prompts)}
    return sorted(
        records, key=lambda r: (order.get(str(r["id"]), len(order)), str(r["id"]), int(r["sample"]))
    )


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    partial.replace(path)


def run_generate(args: argparse.Namespace, source: Any, model: Any, tokenizer: Any, out: Path) -> int:
    from ift_dist import dist

    records = generate_into(out, args.prompts, args, source, model, tokenizer)
    if dist.rank() == 0:
        lengths = sum(reason == "length" for r in records for reason in r["finish_reasons"])
        turns = sum(len(r["answers"]) for r in records)
        print(
            f"{len(records)} answers ({turns} turns, {lengths} cut at --max-new-tokens {args.max_new_tokens})"
        )
        print(f"answers: {out / ANSWERS_FILE}, page: {out / HTML_FILE}")
    return exit_codes.OK


def score_ifeval_answers(args: argparse.Namespace, records: list[dict[str, Any]], out: Path) -> int:
    """Rank 0: lm-eval's IFEval checkers on the answers; results written and printed."""
    from ift_dist.eval.ifeval import format_table, load_ifeval_inputs, score_ifeval, write_ifeval_results
    from ift_dist.eval.prompt_sets import prompts_file

    inputs = load_ifeval_inputs(prompts_file(IFEVAL_SET, args.data_dir))
    result = score_ifeval(records, inputs, allow_missing=args.limit > 0)
    write_ifeval_results(out, result)
    print(format_table(result))
    print(f"\nresults: {out}/ifeval_results.json, per prompt: {out}/ifeval_scores.jsonl")
    return exit_codes.OK


def run_ifeval(args: argparse.Namespace, source: Any, model: Any, tokenizer: Any, out: Path) -> int:
    from ift_dist import dist

    records = generate_into(out, IFEVAL_SET, args, source, model, tokenizer)
    if dist.rank() != 0:
        return exit_codes.OK
    return score_ifeval_answers(args, records, out)


def run_ifeval_on_file(args: argparse.Namespace) -> int:
    """`ift eval ifeval --answers DIR_OR_FILE`: no model, the answers of an earlier generate."""
    file = answers_path(args.answers)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no answers file")
    out = Path(args.out) if args.out else file.parent
    return score_ifeval_answers(args, read_answers(file), out)
