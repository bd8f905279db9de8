"""A stand-in for `python -m ift_dist.train` in the Slurm tests, started on every rank by DeepSpeed's launcher (the
IFT_LAUNCH_TRAINING_SCRIPT test hook). It behaves as the trainer must behave under the launcher:

- meets the other ranks at MASTER_ADDR:MASTER_PORT (rank 0 listens, the others connect), as torch's env:// does;
- works in steps; on SIGUSR1 or SIGTERM it finishes the current step, "checkpoints" (writes its step to a file)
  and exits with exit_codes.REQUEUE;
- on a restart it resumes from that file; at the end it exits 0.

Knobs (environment): STANDIN_STEPS (16), STANDIN_STEP_SECONDS (0.5), STANDIN_FAIL_RANK + STANDIN_FAIL_AT_STEP
(raise a Python error there, on the first run only), STANDIN_ALWAYS_REQUEUE=1 (ask for a requeue after one step,
on every run), STANDIN_IGNORE_STOP=1 (install no signal handler: SIGUSR1 stays ignored, as the launcher passes it
down, like a trainer without checkpoint support). Every event goes as one JSON line to <output_dir>/standin/events.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from ift_dist import exit_codes
from ift_dist.config import load_config


def rendezvous(rank: int, world_size: int, timeout: float = 60) -> list[str]:
    """Rank 0 collects "rank@node" from every other rank over TCP at MASTER_ADDR:MASTER_PORT."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    me = f"{rank}@{os.environ.get('SLURMD_NODENAME', '?')}"
    deadline = time.monotonic() + timeout
    if rank == 0:
        peers = [me]
        with socket.create_server((address, port)) as server:
            server.settimeout(timeout)
            while len(peers) < world_size:
                connection, _ = server.accept()
                with connection:
                    peers.append(connection.recv(256).decode())
        return sorted(peers)
    while True:
        try:
            with socket.create_connection((address, port), timeout=5) as connection:
                connection.sendall(me.encode())
            return []
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    output_dir = Path(load_config(args.config, args.overrides).output_dir)
    state_dir = output_dir / "standin"
    state_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    steps = int(os.environ.get("STANDIN_STEPS", "16"))
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.5"))
    fail_rank = int(os.environ.get("STANDIN_FAIL_RANK", "-1"))
    fail_at = int(os.environ.get("STANDIN_FAIL_AT_STEP", "-1"))
    always_requeue = os.environ.get("STANDIN_ALWAYS_REQUEUE") == "1"

    def event(kind: str, **fields) -> None:
        record = {"event": kind, "rank": rank, "restart": restart, "pid": os.getpid(), **fields}
        with (state_dir / "events.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"standin {record}", flush=True)

    stop_signal: list[str] = []
    if os.environ.get("STANDIN_IGNORE_STOP") != "1":
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, lambda number, _frame: stop_signal.append(signal.Signals(number).name))

    peers = rendezvous(rank, world_size)
    checkpoint = state_dir / f"rank{rank}.step"
    step = int(checkpoint.read_text()) if checkpoint.exists() else 0
    event(
        "start",
        step=step,
        world_size=world_size,
        node=os.environ.get("SLURMD_NODENAME"),
        master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        peers=peers,
    )
    while step < steps:
        if rank == fail_rank and step == fail_at and restart == 0:
            event("error", step=step)
            raise RuntimeError(f"stand-in failure on rank {rank} at step {step}")
        time.sleep(step_seconds)
        step += 1
        event("step", step=step)
        if stop_signal or always_requeue:
            checkpoint.write_text(str(step))
            event("checkpoint", step=step, signal=stop_signal[0] if stop_signal else None)
            return exit_codes.REQUEUE
    event("finished", step=step)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
