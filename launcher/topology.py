"""Who is who in a multi-machine run, from the environment: the GPUs of this machine, the hosts of a hostfile, and
for a Slurm job the master address, the master port and this node's rank. No torch: `nvidia-smi` and environment
variables only.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ift_dist.launcher.hostlist import expand_hostlist

logger = logging.getLogger(__name__)

# MASTER_PORT = PORT_BASE + job id % PORT_SPAN: 15000-29999, below Linux's ephemeral range (32768-60999), so an
# outgoing connection of another program cannot already hold the port. Two jobs sharing a first node collide only
# if their ids differ by a multiple of 15000.
PORT_BASE = 15000
PORT_SPAN = 15000


class TopologyError(RuntimeError):
    """The environment does not describe a usable multi-node job (missing or inconsistent variables)."""


@dataclass(frozen=True)
class NodeRole:
    """This node's place in a multi-node run."""

    hosts: tuple[str, ...]  # every node of the job, in Slurm's order (= node rank order)
    node_rank: int  # index of this node in `hosts`
    master_addr: str  # rank 0's node: the first host
    master_port: int
    job_id: str | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


def master_port_for_job(job_id: int | str, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """The rendezvous port of a Slurm job: the same on every node, different for concurrent jobs."""
    return base + int(job_id) % span


def slurm_node_role(environ: Mapping[str, str], master_port: int | None = None) -> NodeRole:
    """This node's role inside a Slurm job step with one task per node (what the batch script starts)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    job_id = environ.get("SLURM_JOB_ID")
    node_id = environ.get("SLURM_NODEID")
    if not nodelist or job_id is None or node_id is None:
        raise TopologyError(
            "not inside a Slurm job step: SLURM_JOB_NODELIST, SLURM_JOB_ID and SLURM_NODEID must be set "
            "(the batch script starts this with srun)"
        )
    hosts = tuple(expand_hostlist(nodelist))
    node_rank = int(node_id)
    expected = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if expected is not None and int(expected) != len(hosts):
        raise TopologyError(
            f"SLURM_JOB_NUM_NODES={expected} but the node list {nodelist!r} has {len(hosts)} hosts"
        )
    if not 0 <= node_rank < len(hosts):
        raise TopologyError(f"SLURM_NODEID={node_rank} is outside the {len(hosts)} hosts of {nodelist!r}")
    name = environ.get("SLURMD_NODENAME")
    if name and name != hosts[node_rank]:
        # Never seen with one task per node; if it happens, ranks would be assigned twice, so stop here.
        raise TopologyError(
            f"SLURMD_NODENAME={name} but host {node_rank} of {nodelist!r} is {hosts[node_rank]}"
        )
    port = master_port if master_port is not None else master_port_for_job(job_id)
    return NodeRole(hosts=hosts, node_rank=node_rank, master_addr=hosts[0], master_port=port, job_id=job_id)


def write_hostfile(path: Path, hosts: tuple[str, ...] | list[str], slots: int) -> Path:
    """A DeepSpeed hostfile: one `host slots=N` line per node."""
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return path


def read_hostfile(path: Path) -> dict[str, int]:
    """Host -> slots, as DeepSpeed reads the file (`host slots=N`, `#` comments, blank lines)."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not match:
            raise TopologyError(f"{path}:{number}: expected 'host slots=N', got {raw!r}")
        if match.group(1) in hosts:
            raise TopologyError(f"{path}:{number}: host {match.group(1)} appears twice")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise TopologyError(f"{path}: no hosts")
    return hosts


def nvidia_smi_list() -> str:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return ""
    try:
        result = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("nvidia-smi -L failed (%s): assuming no GPU", error)
        return ""
    return result.stdout if result.returncode == 0 else ""


def detect_gpus(environ: Mapping[str, str], list_gpus: Callable[[], str] = nvidia_smi_list) -> list[str]:
    """The GPU ids a job on this machine may use: CUDA_VISIBLE_DEVICES when set (CUDA stops at the first invalid
    entry such as -1, and "" hides every GPU), else one per `nvidia-smi -L` line; [] without GPUs or with
    DS_ACCELERATOR=cpu."""
    if environ.get("DS_ACCELERATOR", "cuda") == "cpu":
        return []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for entry in (part.strip() for part in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            ids.append(entry)
        return ids
    count = sum(1 for line in list_gpus().splitlines() if line.startswith("GPU "))
    return [str(index) for index in range(count)]
