"""The `ift launch` subcommand: its arguments, and the dispatch to one machine, a hostfile or Slurm.

    ift launch CONFIG.yaml [key=value ...] [--nproc N] [--dry-run]                     this machine
    ift launch CONFIG.yaml --hostfile H [--node-rank R --master-addr A]                several machines, DeepSpeed's way
    ift launch --slurm [--nodes N --gpus-per-node G ...] [--submit] CONFIG.yaml        a Slurm batch job
    ift train CONFIG.yaml [key=value ...] [--num-gpus N] [--dry-run]                   = the first line

The config is loaded and validated first (its keys, the paths it names, the batch geometry for the world size);
nothing starts or is submitted when it is wrong. Exit code: the training's (see ift_dist.exit_codes); 2 when the
config or an option is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ift_dist import exit_codes
from ift_dist.config import ConfigError, check_paths, load_config
from ift_dist.launcher.local import LaunchError, launch_local, plan_local, validate_world_size
from ift_dist.launcher.quoting import UnsafeValueError
from ift_dist.launcher.slurm import (
    TEMPLATE,
    SlurmError,
    SlurmOptions,
    render_script,
    script_path,
    submit,
    write_script,
)
from ift_dist.launcher.topology import TopologyError

logger = logging.getLogger(__name__)

# option name -> SlurmOptions field; these make sense with --slurm only
_SLURM_VALUES = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem": "mem",
    "time": "time",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "job_name": "job_name",
    "signal_seconds": "signal_seconds",
    "stop_timeout": "stop_timeout",
    "max_restarts": "max_restarts",
    "sbatch_arg": "extra",
}
_LOCAL_ONLY = ("hostfile", "node_rank", "master_addr", "no_rank_logs")
# The rank count without a GPU (DS_ACCELERATOR=cpu counts as none): what plan_local and SlurmOptions default to.
_CPU_RANKS = "without CUDA: 1 rank, on the CPU"


def _add_run_arguments(parser: argparse.ArgumentParser, ranks: str, ranks_help: str, slurm: bool) -> None:
    """What `ift launch` and `ift train` share; the rank count is --nproc for one, --num-gpus for the other."""
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument(ranks, dest="nproc", metavar="N", type=int, help=ranks_help)
    parser.add_argument(
        "--master-port",
        type=int,
        metavar="PORT",
        help=f"rendezvous port (default: 29500 if free, else a free one{'; Slurm: from the job id' if slurm else ''})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print the exact command{' (Slurm: the script)' if slurm else ''}; run nothing",
    )
    parser.add_argument(
        "--no-rank-logs", action="store_true", help="ranks print to the console instead of <output_dir>/logs/"
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`ift train`: `ift launch` on this machine only."""
    ranks_help = f"ranks on this machine (default: every GPU; {_CPU_RANKS})"
    _add_run_arguments(parser, "--num-gpus", ranks_help, slurm=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ranks_help = f"ranks per machine or node (default: every GPU, or --gpus-per-node; {_CPU_RANKS})"
    _add_run_arguments(parser, "--nproc", ranks_help, slurm=True)
    machines = parser.add_argument_group("several machines without Slurm (DeepSpeed hostfile)")
    machines.add_argument("--hostfile", help="DeepSpeed hostfile: one 'host slots=N' line per machine")
    machines.add_argument(
        "--node-rank",
        type=int,
        help="with --hostfile: start only this host's ranks, no ssh (run once per host)",
    )
    machines.add_argument("--master-addr", help="address of rank 0's host (default: DeepSpeed's choice)")
    slurm = parser.add_argument_group("Slurm (sbatch)")
    slurm.add_argument("--slurm", action="store_true", help="render a batch script into <output_dir>/slurm/")
    slurm.add_argument(
        "--submit", action="store_true", help="with --slurm: submit it with sbatch, print the job id"
    )
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= ranks) per node; 0: CPU nodes")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per node for its ranks (sets OMP_NUM_THREADS)")
    slurm.add_argument("--mem", help="memory per node, e.g. 500G (0 = all)")
    slurm.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint", help="node features, e.g. 'h100&ib'")
    slurm.add_argument("--exclusive", action="store_true", help="whole nodes only")
    slurm.add_argument("--job-name", help="default: ift-<output_dir name>")
    slurm.add_argument(
        "--signal-seconds", type=int, default=300, help="USR1 this many seconds before the time limit (300)"
    )
    slurm.add_argument(
        "--stop-timeout",
        type=int,
        help="after USR1, requeue anyway after this long (default: signal-seconds - 90)",
    )
    slurm.add_argument(
        "--max-restarts", type=int, default=10, help="requeues in all before the job gives up (10)"
    )
    slurm.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        help="another #SBATCH directive, e.g. --sbatch-arg=--reservation=x",
    )
    slurm.add_argument("--template", type=Path, default=TEMPLATE, help=argparse.SUPPRESS)


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """`ift launch`: dispatch; ConfigError propagates (the `ift` entry point reports it and exits 2)."""
    try:
        if args.slurm:
            return _run_slurm(args)
        if args.submit or any(_given(args, name) for name in _SLURM_VALUES):
            raise LaunchError("--submit and the Slurm options (--nodes, --time, ...) need --slurm")
    except ConfigError:
        raise
    except (LaunchError, UnsafeValueError, TopologyError, ValueError) as error:
        print(f"ift launch: {error}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    except SlurmError as error:
        print(f"ift launch: {error}", file=sys.stderr)
        return exit_codes.FAILED
    machines = {"hostfile": args.hostfile, "node_rank": args.node_rank, "master_addr": args.master_addr}
    return run_local(args, environ, prog="ift launch", **machines)


def run_local(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str = "ift train",
    **machines: Any,
) -> int:
    """This machine (`ift train`, and `ift launch` without --slurm; `machines`: its --hostfile, --node-rank,
    --master-addr): plan, then run in the foreground, or print the plan with --dry-run. ConfigError propagates."""
    environ = os.environ if environ is None else environ
    try:
        plan = plan_local(
            args.config,
            args.overrides,
            nproc=args.nproc,
            master_port=args.master_port,
            rank_logs=not args.no_rank_logs,
            environ=environ,
            **machines,
        )
    except ConfigError:
        raise
    except (LaunchError, UnsafeValueError, TopologyError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    if args.dry_run:
        print(plan.shell_line())
        return exit_codes.OK
    return launch_local(plan, environ)


def _given(args: argparse.Namespace, name: str) -> bool:
    defaults = {"nodes": 1, "gpus_per_node": 0, "signal_seconds": 300, "max_restarts": 10, "sbatch_arg": []}
    return getattr(args, name) not in (None, False, defaults.get(name))


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    values = {field: getattr(args, name) for name, field in _SLURM_VALUES.items()}
    return SlurmOptions(
        **values, ranks_per_node=args.nproc, exclusive=args.exclusive, master_port=args.master_port
    )


def _run_slurm(args: argparse.Namespace) -> int:
    used = [name for name in _LOCAL_ONLY if getattr(args, name) not in (None, False)]
    if used:
        raise LaunchError(f"--{used[0].replace('_', '-')} does not apply to --slurm")
    config = load_config(args.config, args.overrides)
    # The job runs in this directory (workdir below), on a file system the nodes share.
    check_paths(config, args.config)
    options = slurm_options(args)
    options.validate()
    validate_world_size(config, options.world_size)
    workdir = Path.cwd()
    text = render_script(
        args.config,
        args.overrides,
        options,
        config=config,
        workdir=workdir,
        command_line=reconstruct_command(args),
        template=args.template,
    )
    if args.dry_run:
        print(text, end="")
        return exit_codes.OK
    path = write_script(text, script_path(config, workdir))
    print(f"batch script: {path}", file=sys.stderr)
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(str(path))}", file=sys.stderr)
        return exit_codes.OK
    job_id = submit(path)
    print(f"submitted job {job_id}; output: {path.parent}/slurm-{job_id}.out", file=sys.stderr)
    print(job_id)
    return exit_codes.OK


def reconstruct_command(args: argparse.Namespace) -> list[str]:
    """The `ift launch --slurm` command that rendered the script (for its header comment)."""
    command = ["ift", "launch", "--slurm"]
    for name in ("nproc", "master_port", *_SLURM_VALUES):
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if name == "sbatch_arg" or _given(args, name) or name in ("nproc", "master_port"):
            command += [f"--{name.replace('_', '-')}={item}" for item in values if item is not None]
    if args.exclusive:
        command.append("--exclusive")
    return [*command, args.config, *args.overrides]
