"""The architecture, read from the imports: each heavy dependency enters through exactly one door, and no module of
ift_dist imports itself through others.

deepspeed only in ift_dist/engine.py, omegaconf only in the ift_dist/config/ package, wandb only lazily (inside a
function) in ift_dist/metrics.py, kernels/ never imports the rest of ift_dist, launcher/ never imports torch (it runs on
login nodes), and the module import graph of ift_dist (kernels and launcher included) has no cycle."""

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
    config_package = {
        path.relative_to(REPO).as_posix() for path in (REPO / "ift_dist" / "config").glob("*.py")
    }
    assert users_of("omegaconf") <= config_package


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


def test_checkpoint_package_never_imports_deepspeed_or_the_engine():
    """The checkpoint package gets the engine as an adapter (engine.EngineShards) and a converter function."""
    offenders = {
        path.relative_to(REPO).as_posix(): name
        for path in sorted((REPO / "ift_dist" / "checkpoint").rglob("*.py"))
        for name, _ in imports_of(path)
        if name in ("deepspeed", "ift_dist.engine") or name.startswith("deepspeed.")
    }
    assert offenders == {}
    # `from ift_dist import engine` names the package, not the module: read the names imported from it as well.
    for path in (REPO / "ift_dist" / "checkpoint").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "ift_dist":
                assert "engine" not in {alias.name for alias in node.names}, path


def module_name(package: str, directory: Path, path: Path) -> str:
    parts = [*path.relative_to(directory).with_suffix("").parts]
    return ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else parts[-1:]))


def import_graph() -> dict[str, set[str]]:
    """Module -> the ift_dist modules it imports, at any depth of the file (module level, functions, TYPE_CHECKING).

    `from a.b import c` imports a.b, and a.b.c too when c is a module; a relative import is resolved first."""
    files = {module_name(package, PACKAGE_DIRS[package], path): path for package, path in python_files()}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search, three colours)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert "ift_dist.config.schema" in graph["ift_dist.config"]  # the package re-exports its modules
    assert (
        "ift_dist.config" in graph["ift_dist.launcher.local"]
    )  # a top-level folder, installed under ift_dist
    assert "ift_dist.engine" in graph["ift_dist.export"]  # `from ift_dist import engine as engine_lib`
    assert "ift_dist.data.loader" in graph["ift_dist.data.report"]  # an import inside a function


def test_no_import_cycles_in_ift_dist():
    """Import order never matters and every module can be read without the ones that import it."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
