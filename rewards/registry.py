"""Resolve reward names from a config into the callables TRL's ``GRPOTrainer`` takes.

A recipe config names its rewards (open-r1 style)::

    reward_funcs:
      - retrieval_rank                                   # a built-in
      - name: conciseness                                # a built-in with its own arguments
        kwargs: {target_attributes: 3}
      - my_package.my_rewards:brand_mentioned            # your code: "module:attribute" (or a dotted path,
                                                         #   my_package.my_rewards.brand_mentioned)
    reward_weights: [1.0, 0.2, 0.5]                      # optional; goes to GRPOConfig.reward_weights

and the recipe calls ``get_reward_funcs(config.reward_funcs, encoder=..., catalog=...)``.

Entries
    * a built-in name (``BUILTIN_REWARDS``);
    * an import path ``package.module:attr`` or ``package.module.attr`` (``attr`` may be dotted,
      ``module:Class.attr``). **Import paths execute the named module's code**: take them only from
      the user's own config, never from data;
    * a mapping ``{"name": <built-in or import path>, "kwargs": {...}}``: per-entry arguments;
    * an already built callable or a class (programmatic use).

What a resolved object becomes
    * a **class** is instantiated with the per-entry ``kwargs`` plus those *shared* keyword
      arguments its ``__init__`` names explicitly (``encoder``/``catalog`` reach ``retrieval_rank``
      but not ``conciseness``; a bare ``**kwargs`` receives no shared ones). Per-entry kwargs win
      over shared ones and must all be accepted;
    * a **function** is returned as is; per-entry kwargs bind with ``functools.partial`` (TRL logs
      it under the function's name); shared kwargs are not passed to functions;
    * an **instance** (a callable object) is returned as is and takes no kwargs.

Anything that is a ``torch.nn.Module`` is refused: TRL would run it as a sequence-classification
reward model. Two rewards with the same ``__name__`` are refused: TRL logs rewards by name, so
their metrics and completion-table columns would merge.

Weights stay TRL's: pass ``reward_weights=[...]`` (one per reward, in order) to ``GRPOConfig``;
``validate_reward_weights`` checks them against the resolved list first, with a clear message.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = ["BUILTIN_REWARDS", "get_reward_funcs", "resolve_reward", "validate_reward_weights"]

# Built-in name -> "module:attribute". Modules are imported only when their reward is asked for
# (retrieval_rank pulls in torch, the encoder and faiss).
BUILTIN_REWARDS: dict[str, str] = {
    "retrieval_rank": "rewards.retrieval_rank:RetrievalRankReward",
    "attribute_format": "rewards.attribute_rewards:AttributeFormatReward",
    "attribute_f1": "rewards.attribute_rewards:AttributeF1Reward",
    "conciseness": "rewards.attribute_rewards:ConcisenessReward",
}

_FORMS = (
    "a built-in name, 'package.module:function' or 'package.module.function' (an import path to "
    "your own reward; it executes that module), or {'name': ..., 'kwargs': {...}}"
)


def _is_module(obj: object) -> bool:
    """isinstance/issubclass of torch.nn.Module, without importing torch when nothing did yet."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    module = torch.nn.Module
    return isinstance(obj, module) or (inspect.isclass(obj) and issubclass(obj, module))


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown reward {name!r}. Built-in rewards: {', '.join(sorted(BUILTIN_REWARDS))}. "
        f"A custom reward is named by its import path: 'package.module:function' or "
        f"'package.module.function' (the module must be importable, e.g. installed or on PYTHONPATH)."
    )


def _import_attr(module_name: str, attr: str, path: str) -> object:
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"cannot resolve reward {path!r}: {module_name!r} has no attribute {attr!r}") from None
    return obj


def _load(path: str) -> object:
    """Import ``module:attr`` or ``module.attr``; ValueError naming the path on any failure."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
        if not module_name or not attr or ":" in attr:
            raise ValueError(f"malformed reward path {path!r}: expected 'package.module:function'")
        candidates = [(module_name, attr)]
    else:
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise _unknown(path)
        # Longest importable module first: "a.b.c.f" tries a.b.c -> f, then a.b -> c.f, then a -> b.c.f.
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    last_error: BaseException | None = None
    for module_name, attr in candidates:
        try:
            return _import_attr(module_name, attr, path)
        except ModuleNotFoundError as err:
            # Only "this very module (or a parent) does not exist" means: try a shorter module name.
            # A missing dependency *inside* the user's module is a real error and is reported.
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                last_error = err
                continue
            raise ValueError(f"importing reward {path!r} failed: {type(err).__name__}: {err}") from err
        except ValueError:
            raise
        except Exception as err:  # ImportError, SyntaxError, anything the module raises at import
            raise ValueError(f"importing reward {path!r} failed: {type(err).__name__}: {err}") from err
    raise ValueError(
        f"importing reward {path!r} failed: {type(last_error).__name__}: {last_error}. "
        f"Expected {_FORMS}; built-ins: {', '.join(sorted(BUILTIN_REWARDS))}."
    ) from last_error


def _accepted(func: Callable) -> tuple[set[str], bool]:
    """(explicitly named keyword-passable parameters, whether it takes **kwargs)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature
        return set(), True
    names, var_kw = set(), False
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(param.name)
    return names, var_kw


def _label(entry: object) -> str:
    return entry if isinstance(entry, str) else getattr(entry, "__name__", type(entry).__name__)


def resolve_reward(entry, shared_kwargs: Mapping | None = None):
    """One config entry -> one reward callable (see the module docstring for the rules)."""
    shared_kwargs = dict(shared_kwargs or {})
    kwargs: dict = {}
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"name", "kwargs"})
        if "name" not in entry or unknown:
            raise ValueError(
                f"a reward entry given as a mapping needs 'name' and optionally 'kwargs', got keys "
                f"{sorted(entry)}" + (f" (unknown: {unknown})" if unknown else "")
            )
        kwargs = entry.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"'kwargs' of reward {entry['name']!r} must be a mapping, got {type(kwargs).__name__}")
        kwargs = dict(kwargs)
        entry = entry["name"]
    label = _label(entry)
    if isinstance(entry, str):
        name = entry.strip()
        if name in BUILTIN_REWARDS:
            obj = _load(BUILTIN_REWARDS[name])
        elif ":" in name or "." in name:
            obj = _load(name)
        else:
            raise _unknown(name)
    else:
        obj = entry

    if _is_module(obj):
        raise TypeError(
            f"reward {label!r} is a torch.nn.Module; TRL would run it as a sequence-classification reward "
            "model. Wrap it in a plain class with a __call__(prompts, completions, **kwargs) and a __name__."
        )
    if inspect.isclass(obj):
        names, _ = _accepted(obj)
        names.discard("self")
        rejected = sorted(set(kwargs) - names)
        if rejected:
            raise ValueError(
                f"reward {label!r} ({obj.__qualname__}) does not accept kwargs {rejected}; "
                f"its arguments are {sorted(names)}"
            )
        call_kwargs = {k: v for k, v in shared_kwargs.items() if k in names}
        call_kwargs.update(kwargs)
        try:
            reward = obj(**call_kwargs)
        except TypeError as err:
            raise ValueError(
                f"could not construct reward {label!r} ({obj.__qualname__}) with {sorted(call_kwargs)}: {err}"
            ) from err
    elif inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, functools.partial):
        reward = obj
        if kwargs:
            names, var_kw = _accepted(obj)
            rejected = sorted(set(kwargs) - names) if not var_kw else []
            if rejected:
                raise ValueError(f"reward function {label!r} does not accept kwargs {rejected}")
            reward = functools.partial(obj, **kwargs)
    elif callable(obj):
        if kwargs:
            raise ValueError(
                f"reward {label!r} is an already built {type(obj).__name__} instance; it takes no "
                f"kwargs (got {sorted(kwargs)}). Point the config at its class instead."
            )
        reward = obj
    else:
        raise TypeError(f"reward {label!r} resolved to a {type(obj).__name__}, which is not callable")
    if not callable(reward) or _is_module(reward):
        raise TypeError(f"reward {label!r} built a {type(reward).__name__}, which is not a plain callable")
    return reward


def _reward_name(func) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def get_reward_funcs(names, **shared_kwargs) -> list[Callable]:
    """Build the reward callables for ``GRPOTrainer(reward_funcs=...)``, in config order.

    ``names``: one entry or a list of entries (built-in name, import path, ``{"name", "kwargs"}``
    mapping, callable or class). ``shared_kwargs`` (e.g. ``encoder=``, ``catalog=``,
    ``known_keys=``) go to every reward *class* whose ``__init__`` names them.
    """
    if isinstance(names, str | Mapping) or callable(names):
        names = [names]
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"reward_funcs must name at least one reward: {_FORMS}; got {names!r}")
    funcs = [resolve_reward(entry, shared_kwargs) for entry in names]
    seen: dict[str, int] = {}
    for i, func in enumerate(funcs):
        name = _reward_name(func)
        if name in seen:
            raise ValueError(
                f"rewards #{seen[name]} and #{i} are both named {name!r}; TRL logs rewards by __name__, so their "
                "metrics would merge. Use each reward once, or give the copies distinct names (retrieval_rank takes "
                "kwargs {'name': ...}; for your own reward, a subclass or wrapper with its own __name__)."
            )
        seen[name] = i
    return funcs


def validate_reward_weights(weights, reward_funcs: Sequence) -> list[float] | None:
    """Check ``weights`` for ``GRPOConfig(reward_weights=...)``: one finite number per reward.

    None stays None (TRL then weighs every reward 1.0). Returns the weights as floats.
    """
    if weights is None:
        return None
    if isinstance(weights, str | bytes | Mapping) or not isinstance(weights, Sequence):
        raise TypeError(f"reward_weights must be a list of numbers, got {type(weights).__name__}")
    names = [_reward_name(f) for f in reward_funcs]
    if len(weights) != len(reward_funcs):
        raise ValueError(
            f"got {len(weights)} reward_weights {list(weights)} for {len(reward_funcs)} reward "
            f"functions {names}: give exactly one weight per reward, in the same order"
        )
    out = []
    for name, weight in zip(names, weights, strict=True):
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"reward weight for {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"reward weight for {name!r} must be finite, got {weight!r}")
        out.append(value)
    return out
