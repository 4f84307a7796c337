"""Odd images: a decompression-bomb header is refused by name; non-RGB modes flow through every model path."""

import json
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from afmrl.catalog.load import CatalogError, load_catalog

MODES = {
    "cmyk.jpg": "CMYK",
    "palette.png": "P",
    "rgba.png": "RGBA",
    "gray16.png": "I;16",
    "gray.png": "L",
    "rgb.png": "RGB",
}


def huge_header_png(path, side=20000):
    """A valid 1x1 PNG whose header claims side x side pixels (a few bytes on disk)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def write_catalog(root, names):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, mode in MODES.items():
        if name in names:
            size = (32, 32)
            if mode == "I;16":
                Image.fromarray(rng.integers(0, 65535, size, dtype=np.uint16)).save(root / "images" / name)
            else:
                Image.new(
                    mode, size, tuple([int(x) for x in rng.integers(0, 255, len(mode))]) if mode != "P" else 3
                ).save(root / "images" / name)
    rows = [
        {
            "listing_id": f"L{i}",
            "product_id": f"P{i // 2}",
            "title": f"mug {i}",
            "image": f"images/{n}",
            "split": "train",
            "attributes": {"color": "red"},
        }
        for i, n in enumerate(names)
    ]
    (root / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_decompression_bomb_header_is_refused_with_row_and_field(tmp_path):
    root = write_catalog(tmp_path / "c", ["rgb.png", "rgb.png"])
    huge_header_png(root / "images" / "huge.png")
    with open(root / "catalog.jsonl", "a") as f:
        f.write(
            json.dumps({"listing_id": "HUGE", "product_id": "P0", "title": "big", "image": "images/huge.png"}) + "\n"
        )
    with pytest.raises(CatalogError) as info:
        load_catalog(root)
    message = str(info.value)
    assert "line 3" in message and "'HUGE'" in message and "field 'image'" in message
    assert "DecompressionBomb" in message


@pytest.mark.usefixtures("one_thread")
def test_non_rgb_images_encode_generate_and_train(tmp_path, tiny_encoder_dir, warm_policy_dir, load_recipe):
    names = ["cmyk.jpg", "palette.png", "rgba.png", "gray16.png", "gray.png", "rgb.png"]
    root = write_catalog(tmp_path / "c", names)
    ds = load_catalog(root)
    assert [ds[i]["image"].mode for i in range(len(ds))] == [MODES[n] for n in names]

    from afmrl.encoder.model import ProductEncoder

    embeddings = ProductEncoder.from_pretrained(tiny_encoder_dir).encode(
        list(ds["image"]), list(ds["title"]), show_progress=False
    )
    assert embeddings.shape[0] == len(names) and np.isfinite(embeddings).all()

    recipe = load_recipe("rar_grpo")
    trainer = recipe.cli(
        [
            "--config",
            "recipes/configs/rar_demo.yaml",
            "--gallery_attributes",
            "reference",
            "--beta",
            "0.0",
            "--catalog",
            str(root),
            "--encoder",
            str(tiny_encoder_dir),
            "--encoder_recipe",
            "",
            "--sft_recipe",
            "",
            "--model_name_or_path",
            str(warm_policy_dir),
            "--output_dir",
            str(tmp_path / "run"),
            "--split",
            "train",
            "--eval_split",
            "train",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--max_completion_length",
            "16",
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
            "--disable_tqdm",
            "true",
            "--eval_batch_size",
            "3",
        ]
    )
    assert all(math.isfinite(h["reward"]) for h in trainer.state.log_history if "reward" in h)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rar_attributes"]["n_queries"] == len(names)
