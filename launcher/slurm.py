"""`ift launch --slurm`: renders the batch script from the template slurm/ift.sbatch into the run's output directory
and, with `--submit`, submits it with `sbatch`. Every user-supplied value is quoted or refused (launcher.quoting).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift_dist import exit_codes
from ift_dist.checkpoint.run_dir import RunDir
from ift_dist.launcher.quoting import UnsafeValueError, sbatch_path, sbatch_value, shell_word, shell_words

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "ift.sbatch"
# Slurm's --signal accepts at most 65535 s.
MAX_SIGNAL_SECONDS = 65535


class SlurmError(RuntimeError):
    """sbatch is missing or refused the job."""


@dataclass
class SlurmOptions:
    """What the job asks Slurm for, and how it reacts to the time limit. None = the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU nodes: DeepSpeed's CPU accelerator, `ranks_per_node` processes on gloo
    ranks_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int | None = (
        None  # CPUs of the node's one task, shared by its ranks (OMP_NUM_THREADS follows)
    )
    mem: str | None = None  # per node, Slurm syntax: 500G, 0 = all
    time: str | None = None  # Slurm syntax: minutes, H:M:S, D-H, D-H:M:S
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None  # default: ift-<output_dir name>
    signal_seconds: int = 300  # USR1 this long before the time limit (Slurm may deliver it up to ~60 s off)
    stop_timeout: int | None = (
        None  # after the notice, requeue anyway after this long; default signal_seconds - 90
    )
    max_restarts: int = 10  # requeues in all (time limits, preemptions, failures), SLURM_RESTART_COUNT
    master_port: int | None = None  # default: derived from the job id on every node
    extra: list[str] = field(default_factory=list)  # more #SBATCH directives, e.g. --reservation=maint

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks

    @property
    def resolved_stop_timeout(self) -> int:
        return self.stop_timeout if self.stop_timeout is not None else max(10, self.signal_seconds - 90)

    def validate(self) -> None:
        for name in ("nodes", "signal_seconds", "max_restarts"):
            if getattr(self, name) < (0 if name == "max_restarts" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or (self.ranks_per_node is not None and self.ranks_per_node < 1):
            raise ValueError("--gpus-per-node must be >= 0 and --nproc >= 1")
        if self.gpus_per_node and self.ranks > self.gpus_per_node:
            raise ValueError(f"--nproc {self.ranks} is more than --gpus-per-node {self.gpus_per_node}")
        if self.signal_seconds > MAX_SIGNAL_SECONDS:
            raise ValueError(f"--signal-seconds must be at most {MAX_SIGNAL_SECONDS}")
        if not 0 < self.resolved_stop_timeout < self.signal_seconds:
            raise ValueError(
                f"--stop-timeout {self.resolved_stop_timeout} must be between 0 and --signal-seconds "
                f"{self.signal_seconds}: the job must be requeued before it reaches its time limit"
            )
        limit = parse_slurm_time(self.time) if self.time is not None else None
        if limit is not None and self.signal_seconds >= limit:
            raise ValueError(
                f"--signal-seconds {self.signal_seconds} is not shorter than --time {self.time} ({limit} s): "
                "the job would be told to stop as soon as it starts"
            )


def parse_slurm_time(text: str) -> int | None:
    """Slurm's time syntax -> seconds (None for UNLIMITED/INFINITE): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
    D-HH:MM:SS."""
    if text.strip().lower() in ("unlimited", "infinite"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, first, second, third = match.groups()
    numbers = [int(part) for part in (first, second, third) if part is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (*numbers, 0, 0)[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(numbers) == 1:  # minutes
        return numbers[0] * 60
    if len(numbers) == 2:  # MM:SS
        return numbers[0] * 60 + numbers[1]
    return (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]  # HH:MM:SS


def _default_job_name(output_dir: Path) -> str:
    return "ift-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", output_dir.name).strip("-") or "run")


def sbatch_lines(options: SlurmOptions, output_dir: Path) -> list[str]:
    """The #SBATCH directives; a value that sbatch could misread is refused (UnsafeValueError)."""
    directives = [
        ("--job-name", sbatch_value(options.job_name or _default_job_name(output_dir), "--job-name")),
        ("--nodes", str(options.nodes)),
        ("--ntasks-per-node", "1"),  # one launcher per node; it starts the node's ranks
    ]
    if options.cpus_per_task is not None:
        directives.append(("--cpus-per-task", str(options.cpus_per_task)))
    if options.gpus_per_node:
        directives.append(("--gpus-per-node", str(options.gpus_per_node)))
    for name in ("mem", "time", "partition", "account", "qos", "constraint"):
        value = getattr(options, name)
        if value is not None:
            directives.append((f"--{name}", sbatch_value(value, f"--{name}")))
    directives += [
        (
            "--requeue",
            None,
        ),  # the script requeues itself; Slurm may also requeue it (node failure, preemption)
        ("--signal", f"B:USR1@{options.signal_seconds}"),  # B: the batch shell gets it, and passes it on
        ("--open-mode", "append"),  # keep the output of earlier runs when requeued
        # %j: Slurm puts the job id into the file name
        (
            "--output",
            sbatch_path(output_dir / "slurm", "output_dir (for #SBATCH --output)") + "/slurm-%j.out",
        ),
    ]
    if options.exclusive:
        directives.append(("--exclusive", None))
    lines = [f"#SBATCH {name}" if value is None else f"#SBATCH {name}={value}" for name, value in directives]
    for extra in options.extra:
        if not extra.startswith("--"):
            raise UnsafeValueError(f"--sbatch-arg {extra!r}: must be a long option, e.g. --reservation=maint")
        lines.append(f"#SBATCH {sbatch_value(extra, '--sbatch-arg')}")
    return lines


def render_script(
    config_path: str,
    overrides: list[str],
    options: SlurmOptions,
    *,
    config: Any,
    workdir: Path,
    command_line: list[str],
    python: str = sys.executable,
    template: Path = TEMPLATE,
) -> str:
    """The batch script's text. `config` is the loaded (validated) config; its output_dir holds everything."""
    options.validate()
    output_dir = (workdir / config.output_dir).resolve()
    script = output_dir / "slurm" / "job.sbatch"
    config_file = str((workdir / config_path).resolve())
    values = {
        "COMMAND": shell_words(command_line, "the command line"),
        "SCRIPT": shell_word(script, "output_dir"),
        "SBATCH_LINES": "\n".join(sbatch_lines(options, output_dir)),
        "WORKDIR": shell_word(workdir, "the working directory"),
        "PYTHON": shell_word(python, "the Python executable"),
        "TRAIN_ARGS": shell_words([config_file, *overrides], "the config path and overrides"),
        "LOG_DIR": shell_word(RunDir(output_dir).logs, "output_dir"),
        "STATUS_ROOT": shell_word(output_dir / "slurm" / "status", "output_dir"),
        "RANKS_PER_NODE": str(options.ranks),
        "MAX_RESTARTS": str(options.max_restarts),
        "STOP_TIMEOUT": str(options.resolved_stop_timeout),
        "NODE_ARGS": "" if options.master_port is None else f"--master-port {int(options.master_port)}",
        "EXIT_REQUEUE": str(exit_codes.REQUEUE),
        "EXPORTS": ""
        if options.gpus_per_node
        else "export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} # CPU nodes: gloo",
    }
    return fill_template(template.read_text(), values)


def fill_template(text: str, values: dict[str, str]) -> str:
    """Replace every {{NAME}}; a placeholder without a value, or a value without a placeholder, is an error."""
    names = set(re.findall(r"\{\{([A-Z_]+)\}\}", text))
    if names != set(values):
        raise KeyError(f"template placeholders {sorted(names)} do not match the values {sorted(values)}")
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda match: values[match.group(1)], text)


def script_path(config: Any, workdir: Path) -> Path:
    return (workdir / config.output_dir).resolve() / "slurm" / "job.sbatch"


def write_script(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(path: Path, environ: dict[str, str] | None = None) -> str:
    """`sbatch --parsable PATH` -> the job id."""
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=environ, timeout=120
        )
    except FileNotFoundError as error:
        raise SlurmError(
            "sbatch not found: run this on a Slurm login node (or submit the script by hand)"
        ) from error
    if result.returncode:
        raise SlurmError(
            f"sbatch {shlex.quote(str(path))} failed ({result.returncode}): {result.stderr.strip()}"
        )
    # --parsable prints "<job id>" or "<job id>;<cluster>"
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"unexpected sbatch output {result.stdout!r}")
    return job_id
