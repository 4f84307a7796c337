"""A vision stage for tiny MLLMs: the tower learns to read each visible key before it learns to caption.

Real MLLMs start from a vision tower that already sees (Qwen2-VL's ViT comes from a contrastively pretrained CLIP);
a tiny model starts from random weights, and a caption objective teaches its tower only what is cheapest to read. On
the fair test's equal-ink corpus (every pattern the same mean colour) the generator base named the pattern at chance
after four caption passes, while the same tower and view, trained directly on the pattern, read it at 80% in three
minutes, and the embedder's coarser view (56 px, 4 tokens) did not (docs/experiments/fair_test_plan.md, the direct
readout). ``train_vision_stage`` is that direct training: the tower and merger, one attention-pooled linear head per
visible key, cross-entropy on the catalog's true values; the heads are then dropped and the model goes on to its
caption pretraining (``recipes/pretrain_tiny.py --vision_steps N``). ``readout_accuracy`` scores such heads on
held-out photos (``experiments/vision_readout.py`` trains them on a frozen or a fresh tower).

    heads = train_vision_stage(model, processor, corpus, keys=["pattern", "logo"], steps=2400)
    readout_accuracy(heads, processor, held_out, keys=["pattern", "logo"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup


def first_photo(image, max_side: int = 0):
    """A listing's first photo as RGB (``image`` is one image or a list), scaled down (bicubic, as the encoder's
    ``image_max_side``) when ``max_side`` > 0 and the photo is larger."""
    image = (image[0] if isinstance(image, list | tuple) else image).convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return image


def key_values(catalog, keys: Sequence[str], column: str = "true_attributes") -> dict[str, list[str]]:
    """Each key's values in ``catalog`` (sorted), the heads' classes."""
    return {k: sorted({str(a[k]) for a in catalog[column] if a and a.get(k) is not None}) for k in keys}


class KeyReadout(torch.nn.Module):
    """A vision tower (with its merger) and, per key, a learned query that attends over the image tokens; the
    attended token and the tokens' mean go through one linear layer to that key's values."""

    def __init__(self, visual, values: dict[str, list[str]]):
        super().__init__()
        self.visual = visual
        width = getattr(visual.config, "out_hidden_size", None) or visual.config.hidden_size  # the merger's output
        self.values = values
        self.queries = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(width)) for k in values})
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(2 * width, len(v)) for k, v in values.items()})

    def forward(self, pixel_values, grid_thw) -> dict[str, torch.Tensor]:
        tokens = self.visual(pixel_values, grid_thw=grid_thw).pooler_output
        per_image = tokens.reshape(grid_thw.shape[0], -1, tokens.shape[-1])  # every photo has the same token count
        mean = per_image.mean(1)
        logits = {}
        for key, head in self.heads.items():
            weights = torch.softmax(per_image @ self.queries[key] / per_image.shape[-1] ** 0.5, dim=1)
            logits[key] = head(torch.cat([(weights[..., None] * per_image).sum(1), mean], -1))
        return logits


def _pixels(processor, images, max_side: int = 0):
    batch = processor.image_processor(images=[first_photo(im, max_side) for im in images], return_tensors="pt")
    return batch["pixel_values"], batch["image_grid_thw"]


def _labels(attributes, values: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Each key's class per row; -100 (ignored by the loss, not counted by the accuracy) where the row has no value
    for the key or one the heads were not built with."""
    out = {}
    for key, known in values.items():
        found = [(a or {}).get(key) for a in attributes]
        out[key] = torch.tensor([known.index(str(v)) if v is not None and str(v) in known else -100 for v in found])
    return out


def train_vision_stage(
    model,
    processor,
    catalog,
    keys: Sequence[str],
    steps: int,
    *,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    column: str = "true_attributes",
    readout: KeyReadout | None = None,
    train_tower: bool = True,
    image_max_side: int = 0,
    on_step: Callable[[int, KeyReadout], None] | None = None,
) -> KeyReadout:
    """Train ``model``'s vision tower (in place, unless ``train_tower`` is False) with a ``KeyReadout`` on
    ``catalog``'s photos and true ``keys`` for ``steps`` batches (AdamW, warmup and cosine decay, gradients clipped
    at 1); photos are drawn in a permutation seeded by ``seed``, and a batch without any value of ``keys`` is skipped.
    Returns the readout (its ``losses`` attribute holds each trained step's loss). ``image_max_side`` scales photos
    down first (the embedder's view); ``on_step(step, readout)`` runs after every step (an evaluation, say)."""
    torch.manual_seed(seed)
    readout = readout or KeyReadout(model.model.visual, key_values(catalog, keys, column))
    readout.visual.requires_grad_(train_tower)
    params = [p for p in readout.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    order = np.random.default_rng(seed).permutation(len(catalog))
    readout.train()
    readout.losses = []
    for step in tqdm(range(steps), desc="vision stage"):
        rows = catalog.select(order[(step * batch_size + np.arange(batch_size)) % len(order)])
        logits = readout(*_pixels(processor, rows["image"], image_max_side))
        targets = _labels(rows[column], readout.values)
        present = [k for k in readout.values if (targets[k] >= 0).any()]  # a key no row has a value for adds nothing
        if present:
            loss = sum(torch.nn.functional.cross_entropy(logits[k], targets[k]) for k in present)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            readout.losses.append(loss.item())
        schedule.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step + 1, readout)
    readout.visual.requires_grad_(True)
    readout.eval()
    return readout


@torch.no_grad()
def readout_accuracy(
    readout: KeyReadout,
    processor,
    catalog,
    *,
    batch_size: int = 64,
    column: str = "true_attributes",
    image_max_side: int = 0,
) -> dict[str, float]:
    """Per key, the fraction of ``catalog``'s photos (those with a value for it) whose true value the readout's head
    ranks first."""
    was_training = readout.training
    readout.eval()
    hits, counted = dict.fromkeys(readout.values, 0), dict.fromkeys(readout.values, 0)
    for start in range(0, len(catalog), batch_size):
        rows = catalog.select(range(start, min(start + batch_size, len(catalog))))
        logits = readout(*_pixels(processor, rows["image"], image_max_side))
        for key, target in _labels(rows[column], readout.values).items():
            hits[key] += int((logits[key].argmax(-1) == target).sum())
            counted[key] += int((target >= 0).sum())
    readout.train(was_training)
    return {k: hits[k] / max(counted[k], 1) for k in readout.values}
