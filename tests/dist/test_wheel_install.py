"""A plain install is enough to train: the wheel without extras, in a fresh virtual environment, at the locked
versions, runs a 2-rank ZeRO-3 step from a directory outside the repository (so nothing of the source tree is
importable). It proves every runtime dependency is declared (accelerate: transformers' DeepSpeed integration, without
which from_pretrained would load the whole model on every rank) and that the installed layout imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import pytest
from built_wheel import build_wheel
from dist_helpers import REPO, TINY_CONFIG, free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **options)
    assert result.returncode == 0, (
        f"{command} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}"
    )
    return result


def test_wheel_without_extras_trains_a_zero3_step(tmp_path, tiny_model):
    wheel = build_wheel(tmp_path)
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    # --no-compile: byte-compiling torch and its siblings takes ~20 s of the install and proves nothing here.
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    run([*pip, "-c", str(REPO / "constraints.txt"), "torch==2.13.0", str(wheel)])

    installed = run([str(python), "-m", "pip", "list", "--format=json"]).stdout
    names = {package["name"].lower() for package in json.loads(installed)}
    assert "accelerate" in names  # a declared dependency, not an extra
    assert not {"gguf", "pytest", "ruff"} & names  # no extras came along

    output_dir = tmp_path / "run"
    data = REPO.parent / "shared" / "data"
    overrides = [
        f"output_dir={output_dir}",
        f"model.name_or_path={tiny_model}",
        f"data.tokenizer={REPO.parent / 'shared' / 'tokenizers' / 'smollm2-135m-instruct'}",
        f"data.sources[0].path={data / 'llamafactory' / 'identity.json'}",
        f"data.sources[1].path={data / 'fastchat' / 'dummy_conversation.json'}",
        "data.eval_sources=[]",
        "train.max_steps=1",
        "train.sample_prompts=[]",
        "train.save_at_end=false",
    ]
    deepspeed = str(environment / "bin" / "deepspeed")
    command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ift_dist.train"]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PATH": f"{environment / 'bin'}:{os.environ.get('PATH', '')}",
    }
    run([*command, str(TINY_CONFIG), *overrides], cwd=tmp_path, env=env)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1]
    # The ranks imported the installed package, not the source tree.
    where = run(
        [str(python), "-c", "import ift_dist, ift_dist.kernels.chunked as k; print(k.__file__)"], cwd=tmp_path
    )
    assert where.stdout.strip().startswith(str(environment)), where.stdout
