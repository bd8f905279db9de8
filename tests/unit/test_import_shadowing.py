"""No top-level folder of the repository shadows, or is shadowed by, another distribution's import name.

Every usual way of starting Python from the repository root puts the root first on sys.path (`python -c`,
`python -m`, `deepspeed --module`, `torchrun -m`, `python -m pytest`). A folder there with an `__init__.py` is then a
regular package that wins over any installed package of the same name: our `kernels/` hid Hugging Face's `kernels`,
which transformers >= 5.25 imports, and broke every `from transformers import ...`. Only `ift_dist` may be a
package at the root; `kernels/` and `launcher/` install as `ift_dist.kernels` / `ift_dist.launcher`.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from built_wheel import build_wheel

REPO = Path(__file__).resolve().parents[2]
OURS = "ift_dist"


def root_folders() -> list[str]:
    return sorted(
        path.name
        for path in REPO.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.name.isidentifier()
    )


def run_in_root(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    return subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_only_ift_dist_is_a_package_or_module_at_the_root():
    init_names = {"__init__" + suffix for suffix in importlib.machinery.all_suffixes()}
    packages = [name for name in root_folders() if any((REPO / name / init).exists() for init in init_names)]
    modules = [
        path.name
        for path in REPO.iterdir()
        if path.is_file() and any(path.name.endswith(suffix) for suffix in importlib.machinery.all_suffixes())
    ]
    assert packages == [OURS]
    assert modules == []


def test_an_installed_package_named_like_a_root_folder_wins(tmp_path):
    """For every root folder, an installed regular package of that name is what `import NAME` gets from the root."""
    site = tmp_path / "site"
    names = [name for name in root_folders() if name != OURS]
    assert {"kernels", "launcher", "tests"} <= set(names)
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("PROBE = 'installed'\n")
    code = (
        "import importlib, json\n"
        f"print(json.dumps({{n: getattr(importlib.import_module(n), 'PROBE', None) for n in {names!r}}}))\n"
    )
    result = run_in_root([sys.executable, "-c", code], PYTHONPATH=str(site))  # the root ('') comes first
    assert result.returncode == 0, result.stderr
    shadowed = {
        name: probe for name, probe in __import__("json").loads(result.stdout).items() if probe is None
    }
    assert shadowed == {}


PROBE = (
    "from transformers import LlamaConfig, LlamaForCausalLM; "
    "import ift_dist.kernels.linear_cross_entropy, ift_dist.launcher.verdict, kernels; "
    "print(kernels.__file__)"
)


@pytest.mark.parametrize("style", ["python -c", "python -m"])
def test_transformers_and_our_subpackages_import_from_the_root(style):
    if style == "python -c":
        result = run_in_root([sys.executable, "-c", PROBE])
    else:  # a module run with the root as sys.path[0], as `deepspeed --module` and `torchrun -m` do
        result = run_in_root([sys.executable, "-m", "transformers.models.llama.modeling_llama"])
    assert result.returncode == 0, result.stderr[-3000:]
    if style == "python -c":
        installed = result.stdout.strip()
        assert not installed.startswith(str(REPO / "kernels")), installed


def test_deepspeed_module_launch_from_the_root():
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert deepspeed is not None
    result = run_in_root(
        [deepspeed, "--num_gpus", "1", "--module", "transformers.models.llama.modeling_llama"]
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_the_wheel_installs_our_folders_under_ift_dist_only(tmp_path):
    """The built wheel claims one top-level name: ift_dist (kernels/ and launcher/ inside it)."""
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {OURS}
    # Every module of the source tree is in it (a package missing from pyproject's list would be left out).
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / OURS).rglob("*.py")}
    assert sources - set(names) == set()
    assert "ift_dist/kernels/linear_cross_entropy.py" in names
    assert "ift_dist/launcher/verdict.py" in names
