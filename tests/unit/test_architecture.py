"""The architecture, read from the imports: each heavy dependency enters through exactly one door.

deepspeed only in ift_dist/engine.py, omegaconf only in ift_dist/config.py, wandb only lazily (inside a function) in
ift_dist/metrics.py, kernels/ never imports the rest of ift_dist, launcher/ never imports torch (it runs on login nodes)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {
    "ift_dist": REPO / "ift_dist",
    "ift_dist.kernels": REPO / "kernels",
    "ift_dist.launcher": REPO / "launcher",
}


def python_files():
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            # ift_dist/kernels and ift_dist/launcher are symlinks to the top-level folders, listed on their own
            if not (directory / path.relative_to(directory).parts[0]).is_symlink():
                yield package, path


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module name, imported at module top level?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, top_level: bool):
        for child in ast.iter_child_nodes(node):
            nested = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, top_level))
            visit(child, nested)

    visit(tree, True)
    return found


def users_of(module: str, *, top_level_only: bool = False) -> set[str]:
    users = set()
    for _, path in python_files():
        for name, top_level in imports_of(path):
            if (name == module or name.startswith(module + ".")) and (top_level or not top_level_only):
                users.add(path.relative_to(REPO).as_posix())
    return users


def test_deepspeed_only_in_engine():
    assert users_of("deepspeed") <= {"ift_dist/engine.py"}


def test_omegaconf_only_in_config():
    assert users_of("omegaconf") <= {"ift_dist/config.py"}


def test_wandb_only_lazily_in_metrics():
    assert users_of("wandb") <= {"ift_dist/metrics.py"}
    assert users_of("wandb", top_level_only=True) == set()


def test_kernels_never_import_ift_dist():
    offenders = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "kernels").rglob("*.py")
        for name, _ in imports_of(path)
        if name == "ift_dist" or (name.startswith("ift_dist.") and not name.startswith("ift_dist.kernels"))
    }
    assert offenders == set()


def test_launcher_never_imports_torch():
    modules = [
        "ift_dist.launcher" + ("." + path.stem if path.stem != "__init__" else "")
        for path in sorted((REPO / "launcher").glob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_modules_stay_small():
    """One module, one responsibility: ~400 lines at most (a little slack for docstrings)."""
    too_long = {
        path.relative_to(REPO).as_posix(): n
        for _, path in python_files()
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert too_long == {}
