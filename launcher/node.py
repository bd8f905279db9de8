"""The launcher of one node inside a Slurm job: `srun` starts one per node (see slurm/ift.sbatch); it derives the
node's role from Slurm's variables and runs DeepSpeed's per-node launcher for this node's ranks.

    python -m ift_dist.launcher.node --ranks-per-node G --log-dir DIR --status-dir DIR [--master-port P]
        -- CONFIG.yaml [key=value ...]

Master address: the first host of SLURM_JOB_NODELIST; node rank: SLURM_NODEID; port: from SLURM_JOB_ID
(topology.master_port_for_job) unless given. DeepSpeed's runner gets a hostfile of the job's nodes and
`--no_ssh --node_rank R`, so no node ever reaches another by ssh. Stop signals reach the ranks as SIGUSR1
(launcher.process). The training's rank 0 writes its finished record to <status-dir>/finished (the directory is
the job's and the restart's own, so a record there is this run's). When the training ends, the exit status goes to
<status-dir>/node<R> (launcher.verdict); the node's own exit code is the training's, except REQUEUE, and any code
after the finished record, which become 0 (see the end of main).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from ift_dist import exit_codes
from ift_dist.launcher.process import run_training
from ift_dist.launcher.runner import runner_command
from ift_dist.launcher.topology import NodeRole, TopologyError, slurm_node_role, write_hostfile
from ift_dist.launcher.verdict import FINISHED_RECORD, write_status

logger = logging.getLogger("ift_dist.launcher.node")


def node_command(
    role: NodeRole,
    ranks_per_node: int,
    training_args: list[str],
    hostfile: Path,
    log_dir: Path | None,
    environ,
) -> list[str]:
    """The DeepSpeed runner command for this node."""
    runner_args = [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(role.node_rank),
        "--master_addr",
        role.master_addr,
        "--master_port",
        str(role.master_port),
    ]
    return runner_command(sys.executable, runner_args, training_args, environ, log_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ift_dist.launcher.node", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--ranks-per-node", type=int, required=True, help="ranks on every node (GPUs per node)"
    )
    parser.add_argument("--log-dir", type=Path, help="per-rank log files go here (default: the job's output)")
    parser.add_argument("--status-dir", type=Path, required=True, help="this node's exit status goes here")
    parser.add_argument("--master-port", type=int, help="default: derived from SLURM_JOB_ID")
    parser.add_argument("training_args", nargs=argparse.REMAINDER, help="-- CONFIG.yaml [key=value ...]")
    args = parser.parse_args(argv)
    training_args = args.training_args[1:] if args.training_args[:1] == ["--"] else args.training_args
    logging.basicConfig(level=logging.INFO, format="[ift-node %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        role = slurm_node_role(os.environ, args.master_port)
    except (TopologyError, ValueError) as error:
        logger.error("%s", error)
        return exit_codes.FAILED
    world_size = role.num_nodes * args.ranks_per_node
    logger.info(
        "node %d of %d (%s): ranks %d-%d of %d, master %s:%d",
        role.node_rank,
        role.num_nodes,
        role.hosts[role.node_rank],
        role.node_rank * args.ranks_per_node,
        (role.node_rank + 1) * args.ranks_per_node - 1,
        world_size,
        role.master_addr,
        role.master_port,
    )
    with tempfile.TemporaryDirectory(prefix="ift-node-") as scratch:
        hostfile = write_hostfile(Path(scratch) / "hostfile", role.hosts, args.ranks_per_node)
        command = node_command(role, args.ranks_per_node, training_args, hostfile, args.log_dir, os.environ)
        logger.info("running: %s", " ".join(command))
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
        follow = args.log_dir if args.log_dir is not None and role.node_rank == 0 else None
        finished_record = args.status_dir / FINISHED_RECORD
        outcome = run_training(command, os.environ, follow_log_dir=follow, finished_record=finished_record)
    write_status(args.status_dir, role.node_rank, outcome.code, outcome.stopped, outcome.finished)
    logger.info("node %d: training ended with %s", role.node_rank, exit_codes.describe(outcome.code))
    # REQUEUE is success to srun: with --kill-on-bad-exit, srun would kill the nodes that are still writing their
    # part of the checkpoint. So is a crash after the finished record: the run is done, and the other nodes must get
    # to write their status. The batch script reads the real code from the status file (launcher.verdict).
    return exit_codes.OK if outcome.code == exit_codes.REQUEUE or outcome.finished else outcome.code


if __name__ == "__main__":
    sys.exit(main())
