"""Fixtures of the Slurm tests: one private two-node Slurm cluster for the whole session (tests/slurm/cluster.py),
and `submit`, which runs the real `ift launch --slurm --submit` against it.

Every job runs the launcher's real path: the rendered batch script, srun, one `ift_dist.launcher.node` per node and
DeepSpeed's runner and per-node launcher. Only the training program is swapped through the
IFT_LAUNCH_TRAINING_SCRIPT test hook: by default for standin.py; a test with the real trainer passes
`training_script=None` (and real overrides) and gets `python -m ift_dist.train` on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import LocalSlurm

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin.py"
IFT = str(Path(sys.executable).with_name("ift"))


@pytest.fixture(scope="session")
def slurm_cluster() -> LocalSlurm:
    """Two logical nodes (127.0.0.1, 127.0.0.2) x 2 CPUs; installed with apt-get if needed, never skipped.

    Its directory is not pytest's tmp_path: munged wants every directory above its socket searchable by all (pytest's
    are 0700) and the socket path short. Removed at the end unless IFT_KEEP_SLURM_DIR=1 (logs for debugging)."""
    root = Path(tempfile.mkdtemp(prefix="ift-slurm-", dir="/tmp"))
    root.chmod(0o755)
    cluster = LocalSlurm(root, nodes=2, cpus_per_node=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("IFT_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Job:
    """A submitted job and where its run writes."""

    cluster: LocalSlurm
    job_id: str
    output_dir: Path

    def state(self) -> dict[str, str]:
        return self.cluster.job(self.job_id)

    def wait(self, timeout: float = 150) -> dict[str, str]:
        job = self.cluster.wait_job(self.job_id, timeout)
        assert job.get("JobState") not in (None, "RUNNING", "PENDING", "REQUEUED"), self.describe(job)
        return job

    def events(self) -> list[dict]:
        path = self.output_dir / "standin" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_event(self, condition, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [event for event in self.events() if condition(event)]
            if found:
                return found[0]
            time.sleep(0.3)
        raise AssertionError(f"no such event within {timeout}s\n{self.describe()}")

    def output(self) -> str:
        path = self.output_dir / "slurm" / f"slurm-{self.job_id}.out"
        return path.read_text() if path.exists() else ""

    def describe(self, job: dict | None = None) -> str:
        """Everything needed to debug a failed assertion."""
        job = job or self.state()
        fields = {key: job.get(key) for key in ("JobState", "Reason", "Restarts", "ExitCode")}
        events = "\n".join(json.dumps(event) for event in self.events()[-30:])
        return f"job {self.job_id}: {fields}\n--- output\n{self.output()[-6000:]}\n--- events\n{events}"


@pytest.fixture
def submit(slurm_cluster, tmp_path):
    """submit(*launch_args, overrides=[...], env={...}) -> Job, through `ift launch --slurm --submit`."""

    def run(
        *launch_args: str,
        overrides: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        training_script: Path | None = STANDIN,
        config: Path = REPO / "configs" / "tiny_cpu.yaml",
    ) -> Job:
        output_dir = tmp_path / "run"
        environment = {**slurm_cluster.env, "OMP_NUM_THREADS": "1", **(env or {})}
        environment.pop("IFT_LAUNCH_TRAINING_SCRIPT", None)
        if training_script is not None:
            environment["IFT_LAUNCH_TRAINING_SCRIPT"] = str(training_script)
        command = [
            IFT,
            "launch",
            "--slurm",
            "--submit",
            *launch_args,
            str(config),
            f"output_dir={output_dir}",
        ]
        result = subprocess.run(
            [*command, *overrides], capture_output=True, text=True, env=environment, cwd=REPO, timeout=120
        )
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().splitlines()[-1]
        assert job_id.isdigit(), result.stdout
        return Job(slurm_cluster, job_id, output_dir)

    return run


@pytest.fixture(autouse=True)
def _no_hook_in_this_process():
    """The hook must only ever reach the jobs, never this process's own launches."""
    assert "IFT_LAUNCH_TRAINING_SCRIPT" not in os.environ
