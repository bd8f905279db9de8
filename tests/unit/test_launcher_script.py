"""The Slurm batch script as rendered: quoting (hostile values stay text or are refused), the #SBATCH lines, the
options' checks, and `ift launch --slurm` writing and submitting it (sbatch faked at the process edge)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ift_dist.cli import main as ift_main
from ift_dist.config import load_config
from ift_dist.launcher.quoting import UnsafeValueError, sbatch_path, sbatch_value, shell_word
from ift_dist.launcher.slurm import SlurmOptions, fill_template, parse_slurm_time, render_script, sbatch_lines

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "a; touch {marker}",
    'it\'s "quoted" \\ back',
    "${{HOME}} $PATH * ? [a-z] ~",
    "data.sources[0].system=x' ; touch {marker} ; echo '",
    "ünïcödé → 中文 😀",
    "-- --flag --help",
    "",
]


def bash(script: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=30, **kwargs)


@pytest.mark.parametrize("template", HOSTILE)
def test_shell_word_round_trips_through_bash(tmp_path, template):
    marker = tmp_path / "pwned"
    value = template.format(marker=marker)
    result = bash(f"printf '%s\\0' {shell_word(value, 'x')}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == value + "\0"
    assert not marker.exists()


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "nul\0byte", "tab\there", "esc\x1b[0m", "del\x7f"])
def test_control_characters_are_refused_everywhere(value):
    for check in (shell_word, sbatch_value, sbatch_path):
        with pytest.raises(UnsafeValueError, match="control character"):
            check(value, "--x")


@pytest.mark.parametrize(
    "value", ["a100q", "2-00:00:00", "h100&ib", "[rack1|rack2]", "500G", "proj_1.a-b", "a*2"]
)
def test_sbatch_values_that_mean_nothing_to_sbatch_pass(value):
    assert sbatch_value(value, "--x") == value


@pytest.mark.parametrize("value", ["a b", "a#b", "'q'", '"q"', "a\\b", "$(x)", "`x`", "%j", "x;y", "a>b", ""])
def test_sbatch_values_that_sbatch_could_misread_are_refused(value):
    with pytest.raises(UnsafeValueError):
        sbatch_value(value, "--partition")


def test_output_paths_refuse_percent_and_spaces():
    assert sbatch_path("/scratch/me/run-1", "output_dir") == "/scratch/me/run-1"
    for path in ("/scratch/me/run %j", "/scratch/100%", "/scratch/a&b"):
        with pytest.raises(UnsafeValueError):
            sbatch_path(path, "output_dir")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("2:00:00", 7200),
        ("1-0", 86400),
        ("1-02:30", 95400),
        ("2-00:00:01", 172801),
        ("UNLIMITED", None),
    ],
)
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SlurmOptions(time="5", signal_seconds=300), "not shorter than --time"),
        (SlurmOptions(signal_seconds=60, stop_timeout=60), "--stop-timeout 60"),
        (SlurmOptions(gpus_per_node=4, ranks_per_node=8), "more than --gpus-per-node"),
        (SlurmOptions(nodes=0), "--nodes"),
        (SlurmOptions(time="1:2:3:4"), "--time"),
    ],
)
def test_option_checks(options, message):
    with pytest.raises(ValueError, match=message):
        options.validate()


def test_defaults_derive_ranks_and_stop_timeout():
    assert (
        SlurmOptions().ranks,
        SlurmOptions(gpus_per_node=8).ranks,
        SlurmOptions(ranks_per_node=2).ranks,
    ) == (1, 8, 2)
    assert SlurmOptions(nodes=4, gpus_per_node=8).world_size == 32
    assert SlurmOptions(signal_seconds=300).resolved_stop_timeout == 210


def test_sbatch_lines_for_a_gpu_job():
    options = SlurmOptions(
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=96,
        mem="0",
        time="2-00:00:00",
        partition="gpu",
        account="proj1",
        qos="high",
        constraint="h100&ib",
        exclusive=True,
        signal_seconds=600,
        extra=["--reservation=maint"],
    )
    assert sbatch_lines(options, Path("/scratch/runs/qwen")) == [
        "#SBATCH --job-name=ift-qwen",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --mem=0",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100&ib",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/scratch/runs/qwen/slurm/slurm-%j.out",
        "#SBATCH --exclusive",
        "#SBATCH --reservation=maint",
    ]
    for extra in (["reservation=x"], ["--comment=a b"]):
        with pytest.raises(UnsafeValueError):
            sbatch_lines(SlurmOptions(extra=extra), Path("/r"))


def render(tmp_path, overrides, **options):
    # The overrides are only rendered here, not loaded: `ift launch` loads them first, and the config loader refuses
    # some hostile values by itself (OmegaConf reads ${...} as an interpolation); the quoting must hold regardless.
    config = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"])
    text = render_script(
        str(CONFIG),
        [f"output_dir={tmp_path / 'run'}", *overrides],
        SlurmOptions(**options),
        config=config,
        workdir=REPO,
        command_line=["ift", "launch", "--slurm", str(CONFIG), *overrides],
        python="/opt/venv/bin/python",
    )
    return text


def test_rendered_script_is_valid_bash_and_keeps_hostile_overrides_as_text(tmp_path):
    marker = tmp_path / "pwned"
    overrides = [f"data.sources[0].system={template.format(marker=marker)}" for template in HOSTILE]
    overrides += [
        f"data.sources[0].system={json.dumps(template.format(marker=marker))}" for template in HOSTILE
    ]
    text = render(tmp_path, overrides, nodes=2)
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    assert bash(f"bash -n {path}").returncode == 0
    # Run the variable block for real and print the arguments the training would get.
    variables = text[text.index("WORKDIR=") : text.index("RESTART=")]
    result = bash(variables + '\nprintf "%s\\0" "$WORKDIR" "$PYTHON" "${TRAIN_ARGS[@]}"')
    assert result.returncode == 0, result.stderr
    arguments = result.stdout.decode().split("\0")[:-1]
    assert arguments == [
        str(REPO),
        "/opt/venv/bin/python",
        str(CONFIG),
        f"output_dir={tmp_path / 'run'}",
        *overrides,
    ]
    assert not marker.exists()
    # the header comment holds the command line, quoted, on one line
    assert all(line.startswith("#") for line in text.splitlines()[:4])


def test_rendered_script_for_cpu_and_gpu_nodes(tmp_path):
    cpu = render(tmp_path, [], nodes=2, ranks_per_node=1, max_restarts=4, signal_seconds=120, stop_timeout=45)
    for line in ("RANKS_PER_NODE=1", "MAX_RESTARTS=4", "STOP_TIMEOUT=45", "EXIT_REQUEUE=85", "NODE_ARGS=()"):
        assert f"\n{line}\n" in cpu
    assert "export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}" in cpu
    assert "#SBATCH --signal=B:USR1@120" in cpu
    assert f"LOG_DIR={tmp_path / 'run' / 'logs'}\n" in cpu
    assert "{{" not in cpu
    gpu = render(tmp_path, [], nodes=4, gpus_per_node=8, master_port=29400)
    assert "DS_ACCELERATOR" not in gpu.split("set -uo pipefail")[1].split("if [")[0]
    assert "\nRANKS_PER_NODE=8\n" in gpu and "\nNODE_ARGS=(--master-port 29400)\n" in gpu
    assert "srun " in gpu and "--kill-on-bad-exit=1" in gpu and "scontrol requeue" in gpu


def test_unsafe_output_dir_is_refused(tmp_path):
    with pytest.raises(UnsafeValueError, match="output_dir"):
        render(tmp_path / "with space", [])


def test_fill_template_wants_exactly_its_placeholders():
    assert fill_template("a {{X}} b", {"X": "1"}) == "a 1 b"
    with pytest.raises(KeyError):
        fill_template("a {{X}} {{Y}}", {"X": "1"})
    with pytest.raises(KeyError):
        fill_template("a {{X}}", {"X": "1", "Z": "2"})


def test_ift_launch_slurm_writes_and_submits(tmp_path, capsys, monkeypatch):
    """`ift launch --slurm` writes <output_dir>/slurm/job.sbatch; --submit runs `sbatch --parsable` (a fake here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "4242;cluster"\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    arguments = ["launch", "--slurm", "--nodes=2", "--time=1:00:00", str(CONFIG), f"output_dir={run_dir}"]
    assert ift_main(arguments) == 0
    script = run_dir / "slurm" / "job.sbatch"
    assert script.exists() and os.access(script, os.X_OK)
    assert not (tmp_path / "sbatch.args").exists()
    assert ift_main([*arguments, "--submit"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "4242"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]


def test_ift_launch_slurm_refuses_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    base = ["launch", "--slurm", str(CONFIG), f"output_dir={run_dir}"]
    assert ift_main([*base, "--nodes=3"]) == 2  # 4 rows per step do not split over 3 ranks
    assert "train.global_batch_rows" in capsys.readouterr().err
    assert ift_main([*base, "--partition=gpu;rm"]) == 2
    assert "--partition" in capsys.readouterr().err
    assert ift_main([*base, "--hostfile=h"]) == 2
    assert ift_main([*base, "train.no_such_key=1"]) == 2
    assert not run_dir.exists()
