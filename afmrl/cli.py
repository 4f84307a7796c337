"""Command-line conventions the recipes share: their demo YAML under the flags, and one-line user errors.

A recipe whose catalog defaults to the embedded one runs its demo YAML when called without ``--config``,
and flags given on the command line override that YAML, the way TRL and open-r1 recipes layer flags over
``--config`` (without this, any flag would silently drop the demo and bring back TrainingArguments'
defaults, such as bf16 on a CPU-only machine)::

    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig), epilog=default_config_epilog(DEMO))
    script_args, training_args, model_args = parser.parse_args_and_config(with_default_config(argv, DEMO))

A user error (bad flag, bad catalog row, missing path) ends with ``error: ...`` on stderr and exit code 2.
A recipe that a launcher may start (``accelerate launch``, ``torchrun``, ``deepspeed``) ends its ``__main__`` with
``end_launched_process()``, so that a finished rank exits 0 instead of aborting in the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "USER_ERRORS",
    "default_config_epilog",
    "end_launched_process",
    "fail",
    "given_flags",
    "parse_recipe_args",
    "run_cli",
    "with_default_config",
]

# What a user's input can raise before training starts (CatalogError and EncoderLoadError are ValueErrors):
# each becomes one ``error:`` line and exit code 2, never a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def fail(err: BaseException | str):
    """End the run on a user error: one ``error:`` line on stderr, exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def run_cli(arguments_class, main, argv: Sequence[str] | None = None):
    """A recipe whose flags are one dataclass: parse ``argv`` (default ``sys.argv[1:]``) with transformers'
    ``HfArgumentParser`` and return ``main(arguments)``; a user error is one ``error:`` line and exit code 2."""
    from transformers import HfArgumentParser

    try:
        (arguments,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses(args=argv)
        return main(arguments)
    except USER_ERRORS as err:
        fail(err)


def end_launched_process() -> None:
    """End a rank that a launcher started, after its recipe returned: shut torch.distributed down, then leave the way
    Python would (non-daemon threads joined, ``atexit`` handlers run, so trackers such as wandb finish; stdout and
    stderr flushed) but skip the interpreter's teardown, with exit code 0. Outside a launched rank (no ``WORLD_SIZE``
    in the environment, no process group) it returns and Python exits as usual.

    Why: CPython before 3.14 kills a thread that takes the GIL while the interpreter tears down, and when that thread
    is in C++ code the whole process aborts (SIGABRT, "terminate called without an active exception"). A launched rank
    has such threads at exit: gloo's (``pt_gloo_runloop``, ``gloo_tcp_loop``) outlive ``destroy_process_group``, and a
    work item they drop last may hold a Python tensor. CI saw finished ranks abort this way, failing runs whose outputs
    were complete; tests/test_cli_exit.py reproduces the abort with a torch thread and shows this call avoids it.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just to learn that it was not used
    initialized = dist is not None and dist.is_available() and dist.is_initialized()
    if not initialized and "WORLD_SIZE" not in os.environ:
        return
    if initialized:  # a local call, no barrier: other ranks may still be evaluating
        dist.destroy_process_group()
    # Py_FinalizeEx's steps before the teardown, in its order, through the calls it makes: threading._shutdown
    # (threading's exit hooks, which stop idle executor workers, then joins non-daemon threads), atexit, stdio.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to write
            pass
    os._exit(0)


def given_flags(argv: Sequence[str]) -> set[str]:
    """The ``--flags`` present in ``argv`` (``--a=1`` counts as ``--a``)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def with_default_config(argv: Sequence[str] | None, default: str | Path) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``--config DEFAULT`` in front when it names no ``--config``
    (``--help`` then shows the demo's values as the defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:  # TrlParser's own test (it reads `--config PATH` only)
        return argv
    return ["--config", str(default), *argv]


def default_config_epilog(default: str | Path) -> str:
    """The ``--help`` footer that names the YAML a recipe runs without ``--config``."""
    path = Path(default)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return (
        f"Without --config the recipe runs {path} (the embedded demo) and the flags given override it; with "
        "--config, that YAML replaces it."
    )


def parse_recipe_args(parser, argv: Sequence[str]):
    """``parser.parse_args_and_config(argv)`` (a TrlParser), with transformers' bf16 refusal on a machine
    without a bf16 GPU re-worded to name the recipe's GPU assumption and the two flags that run it on CPU."""
    try:
        return parser.parse_args_and_config(list(argv))
    except ValueError as err:
        import torch

        if "bf16" in str(err) and not torch.cuda.is_available():
            config = argv[argv.index("--config") + 1] if "--config" in argv else "the defaults"
            raise ValueError(
                f"{config} trains in bf16 on GPUs and this machine has no CUDA GPU: to run it on the "
                "CPU add --bf16 false --use_cpu true"
            ) from None
        raise
