"""What a Slurm batch script does once its job step has ended: finish, requeue, or fail; decided from the exit
status each node wrote and from the signals the script received.

Why per-node statuses: with `srun --kill-on-bad-exit` one failing node gets the others killed, and srun then
reports the killed ones (143), not the cause; a Python error on node 1 would look like a lost node. So each node's
launcher writes `node<R>` = "<exit code> <stopped> <finished>" into the status directory (on the shared output_dir),
where `stopped` says a stop signal had reached that node before its training ended: its code is then a consequence
of the signal. The causes are the codes of the nodes that were not stopped. A node whose training checkpointed (85)
reports success to srun, so that srun does not kill the nodes that are still writing their part of the checkpoint;
srun's exit code 0 therefore means "done" only when no node reported 85.

`finished` says the node found the training's finished record (<status dir>/finished, ift_dist.exit_codes): rank 0
wrote it after the run reached train.max_steps and committed its final checkpoint. Such a run is done, whatever the
exit codes say: a rank that crashes in its teardown (SIGABRT at interpreter exit: 250 from DeepSpeed's launcher)
would otherwise read as "a rank was killed" and requeue a finished job.

    a node found the finished record                   -> done, whatever the codes, signals and restarts
    srun exit 0 and no node exited 85                  -> done
    the script got SIGTERM (scancel, preemption, time limit, our requeue) -> stop: Slurm decides, no requeue here
    the script got the USR1 notice                     -> requeue
    a node without status (lost node, killed launcher) -> requeue
    a cause that a restart may fix (85, 128+N, ...)    -> requeue
    a cause in exit_codes.NOT_REQUEUEABLE (1, 2, 3)    -> fail
    only stopped nodes, one of them exited 85          -> requeue (the tasks got SIGTERM, the script did not)
    requeue, but SLURM_RESTART_COUNT >= max restarts   -> fail

Command line (the batch script calls it; it prints one line, "ACTION CODE REASON"):
    python -m ift_dist.launcher.verdict --status-dir D --nodes N --srun-code RC [--notice] [--terminated]
        --restart K --max-restarts M
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ift_dist import exit_codes

# The finished record's name in the status directory (written by the training's rank 0, see node.py).
FINISHED_RECORD = "finished"


@dataclass(frozen=True)
class NodeStatus:
    code: int
    stopped: bool
    finished: bool = False


@dataclass(frozen=True)
class Verdict:
    action: str  # "done", "requeue", "fail" or "stop"
    code: int  # the exit code the batch script ends with
    reason: str


def write_status(status_dir: Path, node_rank: int, code: int, stopped: bool, finished: bool = False) -> Path:
    """Written by each node's launcher when its training has ended (atomically: write, then rename)."""
    status_dir.mkdir(parents=True, exist_ok=True)
    path = status_dir / f"node{node_rank}"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{code} {int(stopped)} {int(finished)}\n")
    temporary.replace(path)
    return path


def read_statuses(
    status_dir: Path, num_nodes: int, wait_seconds: float = 5.0
) -> dict[int, NodeStatus | None]:
    """Node rank -> its status, None where missing. Waits a little for missing files: on a network file system a
    file another node has just written can take a moment to appear."""
    deadline = time.monotonic() + wait_seconds
    while True:
        statuses = {rank: _read_one(status_dir / f"node{rank}") for rank in range(num_nodes)}
        if all(statuses.values()) or time.monotonic() >= deadline:
            return statuses
        time.sleep(0.5)


def _read_one(path: Path) -> NodeStatus | None:
    try:
        # "<code> <stopped> <finished>"; a launcher from before the finished record wrote "<code> <stopped>".
        code, stopped, *finished = path.read_text().split()
        if len(finished) > 1:
            return None
        return NodeStatus(int(code), stopped == "1", finished == ["1"])
    except (OSError, ValueError):
        return None


def decide(
    srun_code: int,
    statuses: dict[int, NodeStatus | None],
    *,
    notice: bool,
    terminated: bool,
    restart: int,
    max_restarts: int,
) -> Verdict:
    """The table in the module docstring, in code."""
    if any(status and status.finished for status in statuses.values()):
        failed = {rank: status.code for rank, status in statuses.items() if status and status.code}
        if not failed:
            return Verdict("done", exit_codes.OK, "training finished")
        rank, code = next(iter(failed.items()))
        detail = f"node {rank} exited with {exit_codes.describe(code)} in its teardown: not requeued"
        return Verdict("done", exit_codes.OK, f"training finished (final checkpoint committed); {detail}")
    checkpointed = any(status and status.code == exit_codes.REQUEUE for status in statuses.values())
    if srun_code == exit_codes.OK and not checkpointed:
        return Verdict("done", exit_codes.OK, "training finished")
    if terminated:
        code = srun_code or exit_codes.REQUEUE
        return Verdict("stop", code, "SIGTERM reached the batch script: Slurm decides (requeue or end)")
    missing = sorted(rank for rank, status in statuses.items() if status is None)
    causes = {
        rank: status.code
        for rank, status in statuses.items()
        if status and not status.stopped and status.code
    }
    requeue_causes = {rank: code for rank, code in causes.items() if exit_codes.is_requeueable(code)}
    if notice:
        reason = "the stop notice (USR1: time limit near or preemption)"
    elif missing:
        reason = f"no exit status from node(s) {missing}: a node or its launcher was lost"
    elif requeue_causes:
        rank, code = next(iter(requeue_causes.items()))
        reason = f"node {rank} ended with {exit_codes.describe(code)}"
    elif causes:
        rank, code = next(iter(causes.items()))
        return Verdict("fail", code, f"node {rank} ended with {exit_codes.describe(code)}: not requeued")
    elif checkpointed:
        reason = "the training was stopped by a signal and checkpointed"
    else:
        return Verdict("fail", srun_code, f"srun ended with {exit_codes.describe(srun_code)}, no cause found")
    code = exit_codes.REQUEUE
    if restart >= max_restarts:
        return Verdict("fail", code, f"{reason}; but the job has restarted {restart} time(s), the maximum")
    return Verdict("requeue", code, f"{reason}: requeue (restart {restart + 1} of at most {max_restarts})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ift_dist.launcher.verdict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--status-dir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--srun-code", type=int, required=True)
    parser.add_argument("--notice", action="store_true", help="the script received the USR1 notice")
    parser.add_argument("--terminated", action="store_true", help="the script received SIGTERM")
    parser.add_argument("--restart", type=int, default=0, help="SLURM_RESTART_COUNT")
    parser.add_argument("--max-restarts", type=int, required=True)
    args = parser.parse_args(argv)
    statuses = read_statuses(args.status_dir, args.nodes)
    verdict = decide(
        args.srun_code,
        statuses,
        notice=args.notice,
        terminated=args.terminated,
        restart=args.restart,
        max_restarts=args.max_restarts,
    )
    print(verdict.action, verdict.code, verdict.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
