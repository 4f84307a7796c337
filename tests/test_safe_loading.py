"""Safe loading, checked over the source tree: torch.load only with weights_only=True, remote code off by default."""

import ast
from pathlib import Path

import pytest

SOURCES = [
    p
    for d in ("afmrl", "agcl", "rar", "rewards", "deploy", "recipes", "benchmarks", "experiments", "tests")
    for p in Path(d).rglob("*.py")
]


def calls(tree, dotted):
    owner, _, name = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            if isinstance(node.func.value, ast.Name) and node.func.value.id == owner:
                yield node


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_torch_load_always_has_weights_only(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for call in calls(tree, "torch.load"):
        flags = {k.arg: k.value for k in call.keywords}
        assert (
            "weights_only" in flags
            and isinstance(flags["weights_only"], ast.Constant)
            and flags["weights_only"].value is True
        ), f"{path}:{call.lineno}: torch.load without weights_only=True"


@pytest.mark.parametrize("path", SOURCES, ids=str)
def test_trust_remote_code_is_never_switched_on_by_default(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        # keyword arguments trust_remote_code=True in calls, and defaults of parameters/fields named so
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), (
                f"{path}:{node.value.lineno}: trust_remote_code=True hard-coded"
            )
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
            value = node.value
            if isinstance(value, ast.Call):  # dataclass field(default=...)
                value = next((k.value for k in value.keywords if k.arg == "default"), None)
            assert not (isinstance(value, ast.Constant) and value.value is True), (
                f"{path}:{node.lineno}: trust_remote_code defaults to True"
            )


def test_the_scan_sees_the_tree():
    names = {p.as_posix() for p in SOURCES}
    assert {"recipes/rar_grpo.py", "agcl/trainer.py", "afmrl/modeling.py", "deploy/product_index.py"} <= names
