"""The embedded default: names that resolve to the synthetic catalog and the tiny models.

Recipes accept ``--catalog embedded`` and ``--model_name_or_path tiny-qwen2-vl`` (or
``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``) so that every command runs on a machine without model or
dataset downloads. The catalog and the random tiny models are built once, deterministically, under
``cache_dir``. The pretrained tiny models (``PRETRAINED_MODELS``) ship inside the package, made by
``recipes/pretrain_tiny.py`` (their model cards name the command); the demo starts from them. Any
other value is passed through unchanged (a path or a hub id).
"""

from __future__ import annotations

from pathlib import Path

from afmrl.embedded.synthetic_catalog import make_synthetic_catalog

EMBEDDED_CATALOG = "embedded"
TINY_MODELS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# name -> what it is; the weights live in PRETRAINED_DIR / name
PRETRAINED_MODELS = {
    "pretrained-tiny-qwen2-vl": "0.27M parameters, 4 tokens per 64 px photo: the demo's encoder backbone",
    "pretrained-tiny-qwen2-vl-large": "1.19M parameters, 16 tokens per photo: the demo's attribute generator",
}


def is_embedded_model(name: str) -> bool:
    """A tiny model the package builds or ships (resolved by ``resolve_model``), not a path or hub id."""
    return name in TINY_MODELS or name in PRETRAINED_MODELS


def resolve_catalog(
    source: str,
    cache_dir: str | Path,
    *,
    num_products: int = 600,
    seed: int = 0,
    image_size: int = 64,
    val_fraction: float = 0.0,
) -> str:
    """``embedded`` → the synthetic catalog's directory (built if missing); anything else unchanged."""
    if source != EMBEDDED_CATALOG:
        return source
    name = f"catalog-{num_products}-seed{seed}"
    name += "" if image_size == 64 else f"-{image_size}px"
    name += "" if not val_fraction else f"-val{val_fraction:g}"
    out = Path(cache_dir) / name
    if not (out / "catalog.jsonl").is_file():  # written last, so a present file means a complete catalog
        make_synthetic_catalog(
            out, num_products=num_products, seed=seed, image_size=image_size, val_fraction=val_fraction
        )
    return str(out)


def resolve_model(name_or_path: str, cache_dir: str | Path, **tiny_kwargs) -> str:
    """``tiny-qwen2-vl`` & co. → a saved tiny model directory (built if missing); a shipped pretrained name → its
    directory in the package; else unchanged."""
    if name_or_path in PRETRAINED_MODELS:
        path = PRETRAINED_DIR / name_or_path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{name_or_path}: the shipped weights are missing from {path} (a partial install? "
                "reinstall the package, or rebuild them with recipes/pretrain_tiny.py)"
            )
        return str(path)
    if name_or_path not in TINY_MODELS:
        return name_or_path
    from afmrl.embedded.tiny_models import tiny_mllm_path

    return str(tiny_mllm_path(Path(cache_dir) / "tiny-models", family=TINY_MODELS[name_or_path], **tiny_kwargs))
