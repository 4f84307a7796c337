"""Training pairs for contrastive learning: (query listing, another listing of the same product).

``ProductPairDataset`` has one item per product, so a batch drawn without replacement never holds
two pairs of the same product (no in-batch duplicates by construction; duplicate SKUs under other
product ids remain, on purpose: they are the false negatives AGCL's filters exist for). Each time
an item is read it draws a pair of distinct listings from (seed, epoch, index), so every epoch sees
new pairs and a resumed run sees the same ones as an uninterrupted run.

``AGCLCollator`` turns a batch of pairs into processor inputs for the encoder plus the side
information the loss needs: product ids, attribute texts (for BM25 weighting) and attribute
signatures (for the ``attribute`` false-negative filter).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import datasets
import torch

from afmrl.attributes import attribute_signature, format_attributes
from afmrl.catalog.load import group_by_product
from afmrl.encoder.crops import listing_views, uses_crops
from agcl.config import INTRA_PRODUCT_TEXTS

logger = logging.getLogger(__name__)


class ProductPairDataset(torch.utils.data.Dataset):
    """One item per product with at least two listings; reading item i draws a random pair."""

    def __init__(self, catalog: datasets.Dataset, seed: int | None = None):
        groups = group_by_product(catalog)
        self.catalog = catalog
        self.groups = [rows for rows in groups.values() if len(rows) >= 2]
        self.skipped_single_listing = len(groups) - len(self.groups)
        if self.skipped_single_listing:
            # Counted and reported, never silently dropped: a product needs two listings to be a pair.
            logger.warning(
                "%d of %d products have a single listing and give no training pair",
                self.skipped_single_listing,
                len(groups),
            )
        if not self.groups:
            raise ValueError("no product has two listings: contrastive training needs pairs of the same product")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def product_groups(self, grouping: str) -> list:
        """The group key of each item's product (read from its first listing).

        ``grouping`` is a column name (``category``) or ``COLUMN:key1,key2`` to group by values of
        an attribute-dict column (``attributes:category,brand``); missing keys group as None.
        """
        column, _, keys = grouping.partition(":")
        if column not in self.catalog.column_names:
            raise ValueError(
                f"--batch_grouping {grouping!r}: the catalog has no column {column!r} "
                f"(columns: {self.catalog.column_names})"
            )
        values = self.catalog[column]
        firsts = [values[rows[0]] for rows in self.groups]
        if not keys:
            return firsts
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        return [tuple((v or {}).get(k) for k in wanted) for v in firsts]

    def __getitem__(self, index: int) -> dict[str, int]:
        # A pure function of (seed, epoch, index), not a running stream: a run resumed from a
        # checkpoint (which skips batches without reading them) draws the same pairs as one never stopped.
        rng = random.Random(f"{self.seed}|{self.epoch}|{index}") if self.seed is not None else random
        query, positive = rng.sample(self.groups[index], 2)
        return {"query": query, "positive": positive}


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Orders products so that products of one group (e.g. same category and brand) share a batch.

    Near-duplicates are found inside such groups, so keeping a group together puts the hard
    negatives that AGCL's weighting emphasises into the same batch (MOON's same-category
    negatives). Groups are shuffled internally, laid end to end in a random order and cut into
    batches: small groups are packed several to a batch (so a batch still mixes groups and
    contrasts across them), a group larger than a batch fills batches of its own. A new order is
    drawn every epoch (``set_epoch``, called by the Trainer's data loader).
    """

    def __init__(self, group_of: Sequence, seed: int = 0):
        self.group_of, self.seed, self.epoch = list(group_of), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.group_of)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a fresh order on the next pass even without set_epoch
        members: dict = {}
        for index, group in enumerate(self.group_of):
            members.setdefault(group, []).append(index)
        groups = [members[g] for g in sorted(members, key=str)]
        for ids in groups:
            rng.shuffle(ids)
        rng.shuffle(groups)
        return iter([i for ids in groups for i in ids])


def _row_views(row: dict, crop: bool = False):
    """A row's image(s) as the encoder sees them (plus the product-region crop when ``crop``)."""
    return listing_views(row["image"] if "image" in row else row["images"], row.get("bbox"), crop)


class AGCLCollator:
    """Builds encoder inputs and loss side-information for a batch of pairs.

    attribute_column: catalog column with attribute dicts used for BM25 weighting, for the
        ``attribute`` filter and (with ``query_attribute_probability``) appended to the query.
    signature_keys: attribute keys that identify a SKU for the ``attribute`` filter.
    query_attribute_probability: chance that a query's attribute text is appended to its input, so
        that the encoder learns to use attributes when a query has them (stage 2 re-embeds queries
        with generated attributes) and to work without them.
    candidate_attribute_probability: the same for the positive (candidate) side, drawn
        independently: for galleries whose listings carry attribute text too (an annotated catalog,
        stage 2's ``--gallery_attributes``), so the encoder learns to match attributes on both sides.
    attribute_key_probability: chance that each key of an appended line is kept (per pair, side and
        key), so that the encoder reads a partial line as evidence rather than as a line it never saw.
        BM25 weights and signatures always use the whole line.
    with_modalities: also return image-only and text-only inputs of the queries (for the
        intra-product image-text term).
    modality_text: the text-only input: the query's ``title``, its whole ``attributes`` line (its
        title where it has none), or ``title+attributes``.
    """

    def __init__(
        self,
        encoder,
        catalog: datasets.Dataset,
        *,
        attribute_column: str | None = "attributes",
        attribute_keys: Sequence[str] | None = None,
        signature_keys: Sequence[str] | None = None,
        query_attribute_probability: float = 0.0,
        candidate_attribute_probability: float = 0.0,
        attribute_key_probability: float = 1.0,
        with_modalities: bool = False,
        modality_text: str = "title",
        seed: int | None = None,
    ):
        if attribute_column is not None and attribute_column not in catalog.column_names:
            raise ValueError(
                f"attribute_column {attribute_column!r} is not a column of the catalog "
                f"(columns: {catalog.column_names})"
            )
        self.encoder = encoder
        self.catalog = catalog
        self.attribute_column = attribute_column
        self.attribute_keys = list(attribute_keys) if attribute_keys else None
        self.signature_keys = list(signature_keys) if signature_keys else None
        self.query_attribute_probability = query_attribute_probability
        self.candidate_attribute_probability = candidate_attribute_probability
        self.attribute_key_probability = attribute_key_probability
        if modality_text not in INTRA_PRODUCT_TEXTS:
            raise ValueError(f"modality_text must be one of {list(INTRA_PRODUCT_TEXTS)}, got {modality_text!r}")
        self.with_modalities = with_modalities
        self.modality_text = modality_text
        self.seed = seed
        self.crop = uses_crops(encoder)

    def _coin(self, item: dict[str, int], side: str = "query") -> float:
        """Uniform [0, 1) per (seed, pair, side): deterministic across resumes, fresh when the pair changes."""
        if self.seed is None:
            return random.random()
        tag = "" if side == "query" else f"{side}|"  # the query's stream predates the candidate's: kept as it was
        return random.Random(f"{self.seed}|{tag}{item['query']}|{item['positive']}").random()

    def _attribute_text(self, row: dict) -> str:
        return format_attributes(row.get(self.attribute_column), self.attribute_keys) if self.attribute_column else ""

    def _appended_text(self, row: dict, item: dict[str, int], side: str) -> str | None:
        """The attribute text appended to one side's input: None when that side's coin says no, else the line with
        each key kept with probability ``attribute_key_probability`` (None when no key survives)."""
        if not self.attribute_column or self._coin(item, side) >= (
            self.query_attribute_probability if side == "query" else self.candidate_attribute_probability
        ):
            return None
        attrs = row.get(self.attribute_column) or {}
        if self.attribute_key_probability < 1:
            attrs = {
                k: v for k, v in attrs.items() if self._coin(item, f"{side}-key-{k}") < self.attribute_key_probability
            }
        return format_attributes(attrs, self.attribute_keys) or None

    def _signature(self, row: dict) -> str | None:
        attrs = row.get(self.attribute_column) if self.attribute_column else None
        if not attrs:
            return None
        return attribute_signature(attrs, self.signature_keys or self.attribute_keys or sorted(attrs))

    def _text_only_inputs(self, queries: list[dict], attribute_lines: list[str]) -> dict:
        """The text side of the intra-product term (see ``modality_text``), written as the full input writes it."""
        n = len(queries)
        titles = [r["title"] for r in queries]
        if self.modality_text == "title":
            return self.encoder.build_inputs([None] * n, titles)
        lines = [a or None for a in attribute_lines]
        if self.modality_text == "attributes":  # the line alone; a listing without one keeps its title
            titles = [None if a else t for t, a in zip(titles, lines, strict=True)]
        return self.encoder.build_inputs([None] * n, titles, lines)

    def __call__(self, items: list[dict[str, int]]) -> dict:
        queries = [self.catalog[i["query"]] for i in items]
        positives = [self.catalog[i["positive"]] for i in items]
        q_attr = [self._attribute_text(r) for r in queries]
        c_attr = [self._attribute_text(r) for r in positives]
        appended = [self._appended_text(r, item, "query") for r, item in zip(queries, items, strict=True)]
        c_appended = None
        if self.candidate_attribute_probability > 0:
            c_appended = [self._appended_text(r, item, "candidate") for r, item in zip(positives, items, strict=True)]
        q_images = [_row_views(r, self.crop) for r in queries]  # decoded and cropped once, used twice below
        batch = {
            "query": self.encoder.build_inputs(q_images, [r["title"] for r in queries], appended),
            "candidate": self.encoder.build_inputs(
                [_row_views(r, self.crop) for r in positives], [r["title"] for r in positives], c_appended
            ),
            "product_ids": [r["product_id"] for r in queries],
            "query_attributes": q_attr,
            "candidate_attributes": c_attr,
            "query_signatures": [self._signature(r) for r in queries],
            "candidate_signatures": [self._signature(r) for r in positives],
        }
        if self.with_modalities:
            batch["query_image_only"] = self.encoder.build_inputs(q_images, [None] * len(queries))
            batch["query_text_only"] = self._text_only_inputs(queries, q_attr)
        return batch
