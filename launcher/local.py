"""`ift launch` without Slurm: plans the DeepSpeed runner command for this machine (one rank per GPU, or N CPU
ranks) or for several machines listed in a DeepSpeed hostfile, then runs it.
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift_dist.checkpoint.run_dir import RunDir
from ift_dist.config import ConfigError, batch_plan, check_paths, load_config
from ift_dist.launcher.runner import rank_environment, runner_command, shell_line
from ift_dist.launcher.topology import detect_gpus, nvidia_smi_list, read_hostfile

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's and torch's default


class LaunchError(ValueError):
    """The requested launch cannot work on this machine (too many ranks, missing options); nothing was started."""


@dataclass
class LocalLaunch:
    """A planned run: the exact command, the variables added to the environment, and where the logs go."""

    command: list[str]
    env_updates: dict[str, str]
    world_size: int
    log_dir: Path | None
    follow_rank_log: bool = True  # copy rank 0's log to the console (rank 0 runs here)
    notes: list[str] = field(default_factory=list)

    def shell_line(self) -> str:
        return shell_line(self.command, self.env_updates)


def validate_world_size(config: Any, world_size: int) -> None:
    """The batch geometry must divide evenly over the ranks; raises ConfigError naming the key, before any start."""
    batch_plan(config.train, config.data.max_length, world_size)


def choose_master_port(requested: int | None) -> int:
    """The requested port, else DeepSpeed's 29500 when free, else any free port (two runs on one machine)."""
    if requested is not None:
        return requested
    with socket.socket() as probe:
        try:
            probe.bind(("", DEFAULT_MASTER_PORT))
            return DEFAULT_MASTER_PORT
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    logger.info("port %d is taken: using %d for the rendezvous", DEFAULT_MASTER_PORT, port)
    return port


def plan_local(
    config_path: str,
    overrides: list[str],
    *,
    nproc: int | None = None,
    hostfile: str | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rank_logs: bool = True,
    environ: Mapping[str, str],
    python: str = sys.executable,
    list_gpus: Callable[[], str] = nvidia_smi_list,
) -> LocalLaunch:
    """Load and validate the config (its keys, the paths it names, the batch geometry), count the ranks, and build
    the command. Raises ConfigError or LaunchError; starts nothing."""
    config = load_config(config_path, overrides)
    check_paths(config, config_path)
    if nproc is not None and nproc < 1:
        raise LaunchError(f"the rank count (--nproc, --num-gpus) must be >= 1, got {nproc}")
    gpus = detect_gpus(environ, list_gpus)
    port = choose_master_port(master_port)
    notes: list[str] = []
    if hostfile is not None:
        runner_args, world_size, ranks_here = _hostfile_args(hostfile, nproc, node_rank, master_addr, notes)
        if not gpus:
            notes.append(
                "no GPU on this machine: DS_ACCELERATOR=cpu is set here; put DS_ACCELERATOR=cpu in "
                "~/.deepspeed_env so that DeepSpeed exports it to the other hosts too"
            )
    else:
        if node_rank is not None:
            raise LaunchError("--node-rank needs --hostfile (it says which host of the hostfile this is)")
        runner_args, world_size = _single_machine_args(gpus, nproc, environ)
        ranks_here = world_size
        # Without a hostfile DeepSpeed's runner warns "Unable to find hostfile" on every run; at error level it
        # says only what went wrong (our launcher prints the command, the ranks' output and their exit codes).
        runner_args += ["--log_level", "error"]
    runner_args += ["--master_port", str(port)]
    validate_world_size(config, world_size)
    log_dir = RunDir(config.output_dir).logs if rank_logs else None
    command = runner_command(python, runner_args, [config_path, *overrides], environ, log_dir)
    env_updates = rank_environment(environ, cpu=not gpus, ranks_per_node=ranks_here)
    # With --hostfile and ssh, rank 0 runs on the first host, which may be another machine.
    follow = hostfile is None or node_rank == 0
    return LocalLaunch(command, env_updates, world_size, log_dir, follow_rank_log=follow, notes=notes)


def _single_machine_args(
    gpus: list[str], nproc: int | None, environ: Mapping[str, str]
) -> tuple[list[str], int]:
    if not gpus:
        ranks = nproc or 1  # not DeepSpeed's CPU default, one rank per NUMA node
        return ["--num_gpus", str(ranks)], ranks  # DeepSpeed's CPU accelerator: N processes on gloo
    ranks = nproc or len(gpus)
    if ranks > len(gpus):
        raise LaunchError(
            f"{ranks} ranks asked for, but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})"
        )
    if "CUDA_VISIBLE_DEVICES" in environ and all(gpu.isdigit() for gpu in gpus):
        # DeepSpeed's runner drops CUDA_VISIBLE_DEVICES when --num_gpus is given and would take GPUs 0..N-1 of the
        # machine; --include keeps exactly the GPUs the user made visible.
        return ["--include", f"localhost:{','.join(gpus[:ranks])}"], ranks
    return ["--num_gpus", str(ranks)], ranks


def _hostfile_args(
    hostfile: str, nproc: int | None, node_rank: int | None, master_addr: str | None, notes: list[str]
) -> tuple[list[str], int, int]:
    """DeepSpeed's multi-node launch: over ssh (pdsh) from this machine, or with --node-rank once per machine."""
    hosts = read_hostfile(Path(hostfile))
    slots = [nproc] * len(hosts) if nproc is not None else list(hosts.values())
    args = ["--hostfile", hostfile]
    if nproc is not None:
        args += ["--num_gpus", str(nproc)]
    if node_rank is not None:
        if not 0 <= node_rank < len(hosts):
            raise LaunchError(f"--node-rank {node_rank}: the hostfile lists {len(hosts)} hosts")
        # Without ssh DeepSpeed cannot ask the first host for its address: default to its name in the hostfile.
        master_addr = master_addr or next(iter(hosts))
        args += ["--no_ssh", "--node_rank", str(node_rank)]
        notes.append(
            f"--node-rank {node_rank}: run the same command with --node-rank 0..{len(hosts) - 1} on every host"
        )
    if master_addr is not None:
        args += ["--master_addr", master_addr]
    ranks_here = slots[node_rank] if node_rank is not None else max(slots)
    return args, sum(slots), ranks_here


def launch_local(plan: LocalLaunch, environ: Mapping[str, str]) -> int:
    """Run the plan in the foreground; returns the training's exit code."""
    from ift_dist.launcher.process import run_training

    for note in plan.notes:
        logger.warning("%s", note)
    logger.info("%d rank(s); command: %s", plan.world_size, plan.shell_line())
    if plan.log_dir is not None:
        plan.log_dir.mkdir(parents=True, exist_ok=True)
        logger.info("per-rank logs: %s/<start time>_rank<N>.log (rank 0 is copied here)", plan.log_dir)
    with tempfile.TemporaryDirectory(prefix="ift-launch-") as scratch:
        outcome = run_training(
            plan.command,
            {**environ, **plan.env_updates},
            follow_log_dir=plan.log_dir if plan.follow_rank_log else None,
            # Rank 0 writes it (it runs here when we follow its log) once the final checkpoint is committed.
            finished_record=Path(scratch) / "finished" if plan.follow_rank_log else None,
        )
    # A crash while the processes tear down (after the final checkpoint; run_training has said so) does not undo
    # a finished run.
    return 0 if outcome.finished else outcome.code


__all__ = ["ConfigError", "LaunchError", "LocalLaunch", "launch_local", "plan_local", "validate_world_size"]
