"""A real, private Slurm cluster on this one machine for the tests: Debian's slurm-wlm and munge packages (installed
with apt-get when missing), one munged, one slurmctld and N slurmd, every daemon on a free loopback port and every
file under one directory; stopped by the PIDs it started.

The logical nodes are named by IP address, 127.0.0.1, 127.0.0.2, ...: Slurm node names double as MASTER_ADDR, and
these resolve without touching /etc/hosts (which is shared with the rest of the machine). Lessons from running such a
cluster (../shared/tools/slurm-local/REPORT.md) that shape the config below:
- `cred_expire` is also the delay before a requeued job may start again: 10 s here instead of Slurm's 120 s.
- Several slurmd on one host work with Debian's build; each node has its own port and spool directory.
- `SlurmdParameters=config_overrides`: nodes advertise the configured CPUs even when the host has fewer.
- No cgroups (`proctrack/linuxproc`, `task/none`) and no accounting (`scontrol show job`, not `sacct`).
- slurmstepd outlives slurmd, so jobs are cancelled before the daemons stop, and leftovers are found by the
  SLURM_CONF in their environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "squeue",
    "sinfo",
    "munged",
    "munge",
)
PACKAGES = ("slurm-wlm", "munge")
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "PREEMPTED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class ClusterError(RuntimeError):
    """The cluster could not be installed, started or queried."""


def ensure_installed(log: Path) -> None:
    """apt-get install Debian's Slurm and munge when a binary is missing (needs root, as in CI)."""
    if all(shutil.which(binary) for binary in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterError(
            f"Slurm is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}"
        )
    # The packages' scripts try to start system-wide daemons; a policy-rc.d that answers 101 forbids that.
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with log.open("ab") as output:
            for command in (
                ["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
            ):
                result = subprocess.run(command, stdout=output, stderr=output, env=environment, timeout=600)
                if result.returncode:
                    raise ClusterError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    finally:
        if created:
            policy.unlink()
    missing = [binary for binary in BINARIES if not shutil.which(binary)]
    if missing:
        raise ClusterError(f"still missing after apt-get: {missing}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


class LocalSlurm:
    """One cluster instance: `start()`, submit jobs with `env`, `stop()`. Holds the paths and ports it chose."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, kill_wait: int = 10) -> None:
        self.root, self.nodes, self.cpus_per_node, self.kill_wait = root, nodes, cpus_per_node, kill_wait
        self.conf = root / "etc" / "slurm.conf"
        self.socket = root / "run" / "munge.socket"
        self.node_names = [f"127.0.0.{index}" for index in range(1, nodes + 1)]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ----------------------------------------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> None:
        for name in ("etc", "run", "log", "state", "munge", *(f"spool/{node}" for node in self.node_names)):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        ensure_installed(self.root / "log" / "apt.log")
        self._start_munge()
        controller_port, *node_ports = free_ports(1 + self.nodes)
        self.conf.write_text(self._slurm_conf(controller_port, node_ports))
        self._daemon(["slurmctld", "-f", str(self.conf)], "slurmctld")
        self._wait(
            timeout, lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout, "slurmctld up"
        )
        for node in self.node_names:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node], f"slurmd-{node}")
        self._wait(timeout, self._nodes_idle, "every node idle")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        run = self.root / "run"
        self._daemon(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={run / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                "--origin=127.0.0.1",
            ],
            "munged",
        )

        def munge_works() -> bool:
            token = subprocess.run(["munge", "-n", "-S", str(self.socket)], capture_output=True, timeout=10)
            decoded = subprocess.run(
                ["unmunge", "-S", str(self.socket)], input=token.stdout, capture_output=True
            )
            return token.returncode == 0 and decoded.returncode == 0

        self._wait(20, munge_works, "munged answering")

    def _slurm_conf(self, controller_port: int, node_ports: list[int]) -> str:
        root = self.root
        memory = 2048
        lines = [
            "# written by tests/slurm/cluster.py: a private test cluster on loopback",
            "ClusterName=iftci",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays the restart of a requeued job (Slurm's default 120 s -> ~150 s per requeue)
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
        ]
        for node, port in zip(self.node_names, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr={node} Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={memory} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def _daemon(self, command: list[str], name: str) -> None:
        """Start a daemon that forks into the background; its output (before it opens its log) goes to a file."""
        with (self.root / "log" / f"{name}.start.log").open("ab") as output:
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=self.env, timeout=60
            )
        if result.returncode:
            raise ClusterError(f"{name} did not start ({result.returncode}); logs in {self.root / 'log'}")

    def _nodes_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return states[1::2].count("idle") == self.nodes

    @staticmethod
    def _wait(timeout: float, condition, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for: {what}")
            time.sleep(0.3)

    # ----------------------------------------------------------------------------------------------- use
    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode:
            raise ClusterError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Wait until the job is in a terminal state (or `until(job)` holds); returns its record."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if (
                until(job) if until else job.get("JobState") in TERMINAL_STATES
            ) or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    # ----------------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Cancel every job, stop the daemons by the PIDs in their pid files, then any process still carrying this
        cluster's SLURM_CONF (job steps outlive slurmd). Safe to call twice."""
        if (self.root / "run" / "slurmctld.pid").exists():
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                self._wait_quietly(30, lambda: not self.run("squeue", "-h", check=False).stdout.strip())
            self.run("scontrol", "shutdown", check=False)
        daemons = [self._pid(path) for path in sorted((self.root / "run").glob("slurm*.pid"))]
        self._stop_pids([pid for pid in daemons if pid], grace=15)
        self._stop_pids(self._processes_of_this_cluster(), grace=0)
        munged = self._pid(self.root / "run" / "munged.pid", marker=str(self.socket))
        if munged:
            os.kill(munged, signal.SIGTERM)
            self._stop_pids([munged], grace=10)

    def _pid(self, path: Path, marker: str | None = None) -> int | None:
        """The PID in a pid file, if that process is alive and its command line names this cluster (PIDs get
        reused)."""
        try:
            pid = int(path.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            return None
        return pid if (marker or str(self.conf)) in command else None

    def _processes_of_this_cluster(self) -> list[int]:
        needle = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environment and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        return found

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"  # an exited daemon stays a zombie until init reaps it

    def _stop_pids(self, pids: list[int], grace: float) -> None:
        self._wait_quietly(grace, lambda: not any(self._alive(pid) for pid in pids))
        for signum, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            alive = [pid for pid in pids if self._alive(pid)]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            self._wait_quietly(wait, lambda alive=alive: not any(self._alive(pid) for pid in alive))

    @staticmethod
    def _wait_quietly(timeout: float, condition) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.3)
