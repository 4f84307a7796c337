"""The tree's import rule, read from the source: recipes -> deploy -> {agcl, rar, rewards} -> afmrl.

``afmrl`` is the ground floor and imports no stage; the three stages import ``afmrl`` and never each other;
``deploy`` uses the stages (but no reward: it annotates with ``rar.annotate`` and searches with
``afmrl.retrieval``); nothing installable imports the scripts above it. Every import counts, also one made inside
a function to stay lazy.
"""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("afmrl", "agcl", "rar", "rewards", "deploy")
SCRIPTS = ("recipes", "benchmarks", "experiments")
ALLOWED = {
    "afmrl": {"afmrl"},
    "agcl": {"afmrl", "agcl"},
    "rar": {"afmrl", "rar"},
    "rewards": {"afmrl", "rewards"},
    "deploy": {"afmrl", "agcl", "rar", "deploy"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages and script folders that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & {*PACKAGES, *SCRIPTS}
    return found


SOURCES = [(package, path) for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize(
    ("package", "path"), SOURCES, ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, Path) else x
)
def test_imports_run_one_way(package, path):
    wrong = imported_packages(path) - ALLOWED[package]
    assert not wrong, (
        f"{path.relative_to(ROOT)} ({package}) imports {sorted(wrong)}; allowed: {sorted(ALLOWED[package])}"
    )


def test_the_rule_catches_a_stage_importing_another(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rewards.retrieval_rank import RetrievalRankReward\n    import agcl.loss\n")
    assert imported_packages(bad) == {"rewards", "agcl"}
    assert len(SOURCES) > 40 and {p for p, _ in SOURCES} == set(PACKAGES)


@pytest.mark.parametrize("package", ["afmrl", "afmrl.encoder", "afmrl.retrieval", "afmrl.catalog", "agcl", "rewards"])
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def project_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every ``from <project module> import name`` in ``path``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in {*PACKAGES, *SCRIPTS}:
                found += [(node.lineno, node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


@pytest.mark.parametrize("folder", [*PACKAGES, *SCRIPTS, "tests"])
def test_every_imported_name_exists(folder):
    """A moved or renamed function breaks no script that imports it lazily (benchmarks and probes run rarely)."""
    missing = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module, name in project_imports(path):
            target = importlib.import_module(module)
            if not hasattr(target, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{path.relative_to(ROOT)}:{line} from {module} import {name}")
    assert not missing, "\n".join(missing)
