"""bench/train_throughput.py reports a contender that fails as a row of the table and goes on with the others; the
failure classification (bench/contender_run.py) and the largest-micro-batch search (bench/micro_batch_search.py) are
pure functions of a run's log and of probe outcomes, tested here on scripted outcomes and once for real on CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from shared_paths import REPO, TOKENIZERS

sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not a package

from contender_run import Outcome, classify_run
from micro_batch_search import largest_fitting, print_search_table

CUDA_OOM_LOG = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "bench/train_throughput_rank.py", line 230, in main
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.83 GiB. GPU 0 has a total capacity of 139.8 GiB
[rank0]:[W1204 12:00:00 ProcessGroupNCCL.cpp:1250] Warning: destroy_process_group() was not called
[2026-12-04 12:00:01,000] [ERROR] [launch.py:341:sigkill_handler] ['python', '-u', ...] exits with return code = 1
"""


def test_classify_cuda_oom_even_when_collective_errors_come_last():
    log = CUDA_OOM_LOG + "[rank1]: torch.distributed.DistBackendError: NCCL communicator was aborted\n"
    outcome = classify_run(1, log)
    assert outcome.status == "oom" and "CUDA out of memory" in outcome.detail
    assert outcome.cell() == "OOM" and not outcome.fits


def test_classify_killed_rank_as_out_of_host_memory():
    log = "step 1\n[ERROR] [launch.py:341:sigkill_handler] ['python', ...] exits with return code = -9\n"
    assert classify_run(1, log).status == "oom"
    assert classify_run(-9, "").status == "oom"
    assert classify_run(137, "no hint\n").status == "oom"


def test_classify_other_failures_by_their_last_error_line():
    log = (
        "Traceback (most recent call last):\n  File 'x.py'\nValueError: first\n"
        "RuntimeError: the real reason | with a pipe\nexits with return code = 1\n"
    )
    outcome = classify_run(1, log)
    assert outcome == Outcome("failed", "RuntimeError: the real reason | with a pipe")
    assert (
        outcome.cell() == "failed: RuntimeError: the real reason / with a pipe"
    )  # a pipe would split the row
    ranked = "[rank0]: Traceback\n[rank0]: ValueError: bad attention.\n[ERROR] [launch.py] exits with return code = 1\n"
    assert classify_run(1, ranked) == Outcome("failed", "ValueError: bad attention.")
    assert classify_run(2, "only this\n") == Outcome("failed", "only this")
    assert classify_run(3, "") == Outcome("failed", "exit 3, no output")
    assert classify_run("timeout", CUDA_OOM_LOG).status == "timeout"
    assert classify_run(0, "all fine\n") == Outcome("ok")


def scripted(largest_that_fits: int | None):
    """A probe that fits up to `largest_that_fits` rows, recording the order of the probes."""
    calls: list[int] = []

    def probe(micro_batch: int) -> Outcome:
        calls.append(micro_batch)
        fits = largest_that_fits is not None and micro_batch <= largest_that_fits
        return Outcome("ok") if fits else Outcome("oom", "CUDA out of memory")

    return probe, calls


@pytest.mark.parametrize("truth", [1, 2, 3, 5, 8, 11, 12, 13, 31, 63, 64])
@pytest.mark.parametrize("start", [1, 4, 8])
def test_search_finds_the_largest_fit_probing_each_size_once(truth, start):
    probe, calls = scripted(truth)
    best, probes = largest_fitting(probe, start=start, limit=64)
    assert best == truth
    assert len(calls) == len(set(calls)) == len(probes)
    assert probes[truth].fits and (truth == 64 or not probes[truth + 1].fits)
    assert len(calls) <= 2 * 7  # doubling/halving then bisecting: logarithmic in the limit


def test_search_doubles_then_bisects():
    probe, calls = scripted(11)
    assert largest_fitting(probe, start=1, limit=64)[0] == 11
    assert calls == [1, 2, 4, 8, 16, 12, 10, 11]


def test_search_when_nothing_fits_and_when_everything_fits():
    probe, calls = scripted(None)
    best, probes = largest_fitting(probe, start=8, limit=64)
    assert best is None and calls == [8, 4, 2, 1] and sorted(probes) == [1, 2, 4, 8]
    probe, calls = scripted(1000)
    assert largest_fitting(probe, start=3, limit=40)[0] == 40
    assert calls == [3, 6, 12, 24, 40]


def test_search_tolerance_trades_probes_for_a_close_lower_bound():
    probe, calls = scripted(13)
    best, _ = largest_fitting(probe, start=8, limit=32, tolerance=0.25)
    assert calls == [8, 16, 12, 14]  # 14 fails and 14 <= 12 x 1.25: stop
    assert best == 12 and best * 1.25 >= 13
    with pytest.raises(ValueError):
        largest_fitting(probe, start=0, limit=8)


@pytest.mark.slow
def test_a_failing_contender_is_a_row_and_the_others_still_run(tmp_path):
    """Real CPU ranks (one each), a tiny random Llama: the Trainer contender is given an attention implementation
    that does not exist and fails at load; ift-dist trains; the table prints both rows."""
    command = [
        sys.executable, str(REPO / "bench/train_throughput.py"), "--contenders", "hf_padded,ift", "--cpu",
        "--ranks", "1", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--max-length", "128", "--steps", "3", "--warmup-steps", "1", "--accumulation", "1",
        "--tokenizer", str(TOKENIZERS / "smollm2-135m-instruct"), "--hf-attention", "no_such_attention",
        "--timeout", "240", "--workdir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    failed = rows["HF Trainer, padded"].split("|")[2].strip()
    assert failed.startswith("failed: ") and "no_such_attention" in failed, failed
    trained = rows["ift-dist (packed rows, fused loss)"].split("|")
    assert float(trained[2].strip().replace(",", "")) > 0  # tokens/s
    assert trained[3].strip() == "-"  # no ratio to a baseline that failed


def test_tables_show_failed_contenders_and_the_search(capsys):
    """The throughput table gets an OOM row without ratios when the baseline failed; the search table shows the
    largest fit, the fastest probe and every probe's outcome, also for a search stopped by its deadline."""
    import argparse

    import train_throughput

    args = argparse.Namespace(warmup_steps=1, steps=3, ranks=1, cpu=True, accumulation=1)
    steps = [{"tokens": 1000, "lengths": [500, 500]} for _ in range(3)]
    ok = {
        "status": "ok",
        "step_seconds": [0.5, 0.25],
        "step_cpu_seconds": [1.0, 1.0],
        "tokens_per_second": 2666.7,
        "peak_memory_gb": [1.5],
        "losses": [2.0, 1.9, 1.8],
    }
    runs = {"ift": [ok], "hf_padded": [{"status": "oom", "detail": "CUDA out of memory"}]}
    train_throughput.print_table(runs, steps, args, flops=None)
    output = capsys.readouterr().out
    assert (
        "| ift-dist (packed rows, fused loss) | 3,000 | - | 1,000 | - | 1.50 | - | n/a | 2.0000 | 1.8000 |"
        in output
    )
    assert "| HF Trainer, padded | OOM |" + " - |" * 8 in output

    summary = {"tokens_per_second": 3000.0, "peak_memory_gb": 1.5, "mfu": None}
    report = {
        "ift": {
            "largest": 8,
            "probes": {
                "4": {"status": "ok", "summary": {**summary, "tokens_per_second": 3500.0}},
                "8": {"status": "ok", "summary": summary},
                "16": {"status": "oom", "detail": "x", "summary": None},
            },
        },
        "hf_padded": {"largest": None, "probes": {"1": {"status": "oom", "detail": "x", "summary": None}}},
        "hf_flat": {"largest": None, "stopped": "deadline", "probes": {}},
    }
    print_search_table(report, args)
    output = capsys.readouterr().out
    assert (
        "| ift-dist (packed rows, fused loss) | 8 | 3,000 | 1.50 | n/a | 3,500 (4) | 4 ok, 8 ok, 16 OOM |"
        in output
    )
    assert "| HF Trainer, padded | none fits | - | - | - | - | 1 OOM |" in output
    assert "| HF Trainer, DataCollatorWithFlattening | not found |" in output
    assert "search stopped at --search-deadline-s |" in output
