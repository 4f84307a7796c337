"""The reward registry: built-ins, import paths, kwargs routing, clear errors, weights, the guide's example."""

import functools
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rewards import (
    BUILTIN_REWARDS,
    AttributeF1Reward,
    AttributeFormatReward,
    ConcisenessReward,
    get_reward_funcs,
    validate_reward_weights,
)

USER_MODULE = """
import torch

CALLS = []


def brand_reward(completions, brand_weight=1.0, **kwargs):
    return [brand_weight * float("brand" in str(c)) for c in completions]


class LengthReward:
    __name__ = "length"

    def __init__(self, scale=1.0, encoder=None):
        self.scale, self.encoder = scale, encoder

    def __call__(self, completions, **kwargs):
        return [self.scale * len(str(c)) for c in completions]


class OpenReward:
    __name__ = "open"

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, completions, **kwargs):
        return [0.0] * len(completions)


class Nested:
    @staticmethod
    def reward(completions, **kwargs):
        return [1.0] * len(completions)


class ModuleReward(torch.nn.Module):
    def forward(self, x):
        return x


built = LengthReward(scale=2.0)
module_instance = ModuleReward()
not_callable = 3
"""


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package `user_rewards_pkg.mod` importable from a temp dir, plus a module that fails to import."""
    pkg = tmp_path / "user_rewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(USER_MODULE)
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed_xyz\n")
    (pkg / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards_pkg"
    for name in [m for m in sys.modules if m.startswith("user_rewards_pkg")]:
        del sys.modules[name]


def test_builtins_resolve_with_their_names():
    funcs = get_reward_funcs(["attribute_format", "conciseness", "attribute_f1"])
    assert [type(f) for f in funcs] == [AttributeFormatReward, ConcisenessReward, AttributeF1Reward]
    assert [f.__name__ for f in funcs] == ["attribute_format", "conciseness", "attribute_f1"]
    assert set(BUILTIN_REWARDS) == {"retrieval_rank", "attribute_format", "attribute_f1", "conciseness"}
    assert get_reward_funcs("conciseness")[0].__name__ == "conciseness"  # one name, not a list


def test_shared_kwargs_are_filtered_by_signature_and_entry_kwargs_win():
    funcs = get_reward_funcs(
        ["attribute_format", {"name": "conciseness", "kwargs": {"target_attributes": 2}}, "attribute_f1"],
        known_keys=["color", "size"],
        encoder="/some/encoder",
        catalog="/some/catalog",
        target_attributes=7,
    )
    assert funcs[0].known_keys == ("color", "size")
    assert funcs[1].target_attributes == 2  # per-entry beats shared
    assert funcs[2].reference_column == "attributes"
    with pytest.raises(ValueError, match=r"does not accept kwargs \['encoder'\]"):
        get_reward_funcs([{"name": "conciseness", "kwargs": {"encoder": "x"}}])
    with pytest.raises(ValueError, match="'name'"):
        get_reward_funcs([{"kwargs": {}}])
    with pytest.raises(ValueError, match="unknown"):
        get_reward_funcs([{"name": "conciseness", "weight": 2}])


@pytest.mark.parametrize("sep", [":", "."])
def test_import_paths_resolve_user_functions_and_classes(user_pkg, sep):
    funcs = get_reward_funcs(
        [
            f"{user_pkg}.mod{sep}brand_reward",
            f"{user_pkg}.mod{sep}LengthReward",
            f"{user_pkg}.mod{sep}Nested.reward",
            f"{user_pkg}.mod{sep}OpenReward",
        ],
        encoder="enc",
        catalog="cat",
    )
    import user_rewards_pkg.mod as mod

    assert funcs[0] is mod.brand_reward
    assert isinstance(funcs[1], mod.LengthReward) and funcs[1].encoder == "enc" and funcs[1].scale == 1.0
    assert funcs[2](completions=["a"]) == [1.0]
    assert funcs[3].kwargs == {}  # **kwargs receives no shared kwargs
    assert get_reward_funcs([f"{user_pkg}.mod{sep}built"], encoder="enc")[0] is mod.built  # instances as they are
    assert funcs[0](completions=["brand: acme", "color: red"]) == [1.0, 0.0]


def test_function_kwargs_bind_with_partial(user_pkg):
    (func,) = get_reward_funcs([{"name": f"{user_pkg}.mod:brand_reward", "kwargs": {"brand_weight": 3.0}}])
    assert isinstance(func, functools.partial)
    assert func(completions=["brand"]) == [3.0]
    from trl.trainer.utils import get_callable_name

    assert get_callable_name(func) == "brand_reward"
    with pytest.raises(ValueError, match="instance"):
        get_reward_funcs([{"name": f"{user_pkg}.mod:built", "kwargs": {"scale": 1}}])


def test_unknown_name_lists_builtins_and_forms():
    with pytest.raises(ValueError) as err:
        get_reward_funcs(["retrieval_rnak"])
    message = str(err.value)
    assert all(name in message for name in BUILTIN_REWARDS)
    assert "package.module:function" in message and "package.module.function" in message


def test_import_failures_name_the_path(user_pkg):
    with pytest.raises(ValueError, match=r"no_such_pkg_xyz\.mod:f.*ModuleNotFoundError"):
        get_reward_funcs(["no_such_pkg_xyz.mod:f"])
    with pytest.raises(ValueError, match=r"user_rewards_pkg\.broken:f.*a_dependency_that_is_not_installed_xyz"):
        get_reward_funcs([f"{user_pkg}.broken:f"])
    with pytest.raises(ValueError, match=r"user_rewards_pkg\.raises\.f.*RuntimeError: boom at import"):
        get_reward_funcs([f"{user_pkg}.raises.f"])
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_funcs([f"{user_pkg}.mod:missing"])
    with pytest.raises(ValueError, match="malformed"):
        get_reward_funcs([":f"])


def test_modules_and_non_callables_are_refused(user_pkg):
    for target in ("ModuleReward", "module_instance"):
        with pytest.raises(TypeError, match="nn.Module.*reward model"):
            get_reward_funcs([f"{user_pkg}.mod:{target}"])
    with pytest.raises(TypeError, match="nn.Module"):
        get_reward_funcs([torch.nn.Linear(2, 1)])
    with pytest.raises(TypeError, match="not callable"):
        get_reward_funcs([f"{user_pkg}.mod:not_callable"])


def test_duplicate_names_and_empty_lists_are_refused():
    with pytest.raises(ValueError, match="both named 'conciseness'"):
        get_reward_funcs(["conciseness", {"name": "conciseness", "kwargs": {"target_attributes": 2}}])
    with pytest.raises(ValueError, match="at least one"):
        get_reward_funcs([])


def test_construction_errors_are_explained():
    with pytest.raises(ValueError, match="could not construct reward"):
        get_reward_funcs([ConcisenessReward], target_attributes="many")  # its TypeError, wrapped


def test_reward_weights_are_checked():
    funcs = get_reward_funcs(["attribute_format", "conciseness"])
    assert validate_reward_weights(None, funcs) is None
    assert validate_reward_weights([1, 0.5], funcs) == [1.0, 0.5]
    with pytest.raises(
        ValueError, match=r"got 3 reward_weights .* for 2 reward functions \['attribute_format', 'conciseness'\]"
    ):
        validate_reward_weights([1, 1, 1], funcs)
    with pytest.raises(ValueError, match="finite"):
        validate_reward_weights([1, float("inf")], funcs)
    with pytest.raises(TypeError):
        validate_reward_weights("1,1", funcs)


# ---------------------------------------------------------------- the guide's example (docs/stage2.md)
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "stage2.md"


def guide_example() -> str:
    match = re.search(r"<!-- custom-reward-example -->\s*```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    assert match, "docs/stage2.md needs a ```python block right after <!-- custom-reward-example -->"
    return match.group(1)


def test_guide_custom_reward_example_runs(tmp_path, monkeypatch):
    code = guide_example()
    namespace = {"__name__": "guide_example"}
    exec(compile(code, "docs/stage2.md:custom-reward-example", "exec"), namespace)
    reward = namespace["brand_mentioned"]
    completions = [
        [{"role": "assistant", "content": "brand: Acme; color: red"}],
        [{"role": "assistant", "content": "color: red"}],
        [{"role": "assistant", "content": "brand: acme"}],
    ]
    out = reward(
        prompts=[None] * 3,
        completions=completions,
        attributes=[{"brand": "acme", "color": "red"}, {"brand": "acme"}, None],
    )
    assert out == [1.0, 0.0, None]
    assert len(namespace["reward_funcs"]) == len(namespace["reward_weights"])

    # The same file as a module resolves through the registry, as a config would name it.
    (tmp_path / "readme_rewards_mod.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        (func,) = get_reward_funcs(["readme_rewards_mod:brand_mentioned"])
        assert func(completions=completions, attributes=[{"brand": "acme"}] * 3) == [1.0, 0.0, 1.0]
    finally:
        sys.modules.pop("readme_rewards_mod", None)


def test_import_rewards_is_light_and_retrieval_rank_is_lazy():
    import subprocess

    code = (
        "import sys, rewards; assert 'torch' not in sys.modules and 'rewards.retrieval_rank' not in sys.modules; "
        "cls = rewards.RetrievalRankReward; assert cls.__name__ == 'RetrievalRankReward'; "
        "assert 'rewards.retrieval_rank' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
