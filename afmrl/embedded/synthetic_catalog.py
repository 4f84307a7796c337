"""A seeded synthetic fine-grained product catalog: the embedded default for tests and the demo.

Real catalogs (M5Product, marketplace dumps) cannot be downloaded where this package is built and
tested, so this module renders one whose difficulty is of the right kind: products that look
alike, sellers who describe them badly, and a teacher whose attributes help but are imperfect.

The generative model, in the order the random draws are made (one ``numpy`` PCG64 stream seeded
by ``seed``, so the same arguments give byte-identical files):

1. **Families.** A family is a base attribute vector over ``ATTRIBUTE_KEYS``
   (category, brand, color, secondary_color, pattern, logo, size) and one *varying key* drawn
   from ``FAMILY_VARYING_KEYS``. Its 2-4 products take distinct values of that key and share every
   other value, so any two products of a family differ in exactly one attribute: these are the
   near-duplicates a fine-grained encoder must separate. No two products share an attribute
   vector (except the duplicate SKUs of step 5).
2. **Split by family.** A ``test_fraction`` of the families (hence of the products) goes to
   ``split="test"``, the rest to ``"train"``; a product's listings never straddle the split, and
   the test gallery keeps its near-duplicate confusers. With ``val_fraction`` > 0 that fraction of
   the train families is relabelled ``"val"`` afterwards, from a separate random stream.
3. **Listings.** Each product has 2-5 listings. A listing's image is rendered from the product's
   *true* attributes: category is the shape, color the body, secondary_color the pattern and
   trim, pattern the texture, logo a small mark; brand and size are not visible (as on real
   photos, they live only in text). Per listing, the object's position, scale, the background
   tone and the pixel noise vary (``afmrl.embedded.photos``).
4. **Titles.** Each listing's title is written by a sloppy seller: every attribute is omitted
   with its own probability (size and secondary color most often), the phrases are shuffled,
   categories have synonyms, and 1-3 filler words ("hot sale", "free shipping" ...) are added.
   The title alone therefore cannot tell near-duplicates apart (measured by
   ``benchmarks/catalog_difficulty.py``).
5. **Duplicate SKUs.** ``duplicate_sku_fraction`` of the train products are re-listed under a
   new ``product_id`` with identical true attributes: real false negatives for contrastive
   training (the ``attribute`` filter of AGCL should catch them). They never enter the test split.
6. **Teacher attributes.** The ``attributes`` column imitates an MLLM teacher run per listing:
   each true attribute is omitted with ``teacher_omission_rate``, replaced by a wrong value of
   the same key with ``teacher_error_rate``, and each redundant, non-discriminative key of
   ``REDUNDANT_VALUES`` (condition, shipping, style) is added with ``teacher_redundancy_rate``.
   The ground truth is kept beside it in ``true_attributes``.

With ``clutter``, every photo is then shrunk onto a scene of coloured shapes at a random spot (its
own random stream) and the product's box in the first photo is written to ``bbox``: the setting
of MOON's product-region crops (``afmrl.encoder.crops``).

Columns written to ``catalog.jsonl``: listing_id, product_id, title, image (or ``images`` when
``images_per_listing > 1``), [bbox,] category, attributes, true_attributes, family_id, split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from afmrl.embedded.photos import PALETTE, place_on_clutter, render_product_image

ATTRIBUTE_KEYS = ("category", "brand", "color", "secondary_color", "pattern", "logo", "size")

ATTRIBUTE_VALUES = {
    "category": ("t-shirt", "mug", "bag", "bottle", "cap", "phone case"),
    "brand": (
        "acme",
        "nordvik",
        "lumo",
        "kestrel",
        "orbis",
        "valta",
        "pinecrest",
        "zephyr",
        "halden",
        "mirova",
        "tasko",
        "brio",
    ),
    "color": tuple(PALETTE),
    "secondary_color": tuple(PALETTE),
    "pattern": ("solid", "striped", "dotted", "checked", "zigzag"),
    "logo": ("none", "star", "circle", "triangle", "cross"),
    "size": ("S", "M", "L", "XL"),
}

# Keys that distinguish near-duplicates. Category and brand stay fixed inside a family.
FAMILY_VARYING_KEYS = ("color", "secondary_color", "pattern", "logo", "size")
# Keys the rendered photo does not show (as on real photos, they live only in text).
INVISIBLE_KEYS = ("brand", "size")

# Attributes a real teacher adds although they say nothing about which product this is.
REDUNDANT_VALUES = {
    "condition": ("new", "brand new"),
    "shipping": ("free", "fast"),
    "style": ("casual", "classic", "modern"),
}

CATEGORY_SYNONYMS = {
    "t-shirt": ("t-shirt", "tee", "shirt"),
    "mug": ("mug", "cup", "coffee mug"),
    "bag": ("bag", "tote", "tote bag"),
    "bottle": ("bottle", "flask", "water bottle"),
    "cap": ("cap", "hat", "baseball cap"),
    "phone case": ("phone case", "case", "phone cover"),
}

FILLER_WORDS = (
    "new",
    "hot sale",
    "free shipping",
    "2026",
    "premium",
    "original",
    "best price",
    "gift",
    "top quality",
    "limited",
    "trendy",
    "fashion",
    "official store",
    "deal",
)

# How often a seller leaves each attribute out of a title (category is almost always there).
TITLE_OMISSION = {
    "category": 0.05,
    "brand": 0.4,
    "color": 0.3,
    "secondary_color": 0.7,
    "pattern": 0.45,
    "logo": 0.55,
    "size": 0.6,
}

ATTRIBUTE_PROMPT_SENTENCES = (
    "List the key attributes of this product.",
    "Answer with key: value pairs separated by semicolons.",
    "Describe the product in the image for identical product retrieval.",
    "Represent the given product for retrieval.",
)


@dataclass
class SyntheticCatalogConfig:
    """Arguments of ``make_synthetic_catalog`` (also the command line of recipes/make_catalog.py)."""

    output_dir: str = field(metadata={"help": "Directory to write catalog.jsonl and images/ into."})
    num_products: int = field(default=600, metadata={"help": "Number of distinct products (incl. duplicate SKUs)."})
    seed: int = field(default=0, metadata={"help": "Random seed; the same arguments give byte-identical files."})
    image_size: int = field(default=64, metadata={"help": "Side of the square PNG images in pixels."})
    min_listings: int = field(
        default=2, metadata={"help": "Fewest listings per product (>= 2 so each has a positive)."}
    )
    max_listings: int = field(default=5, metadata={"help": "Most listings per product."})
    min_family_size: int = field(default=2, metadata={"help": "Fewest near-duplicate products per family."})
    max_family_size: int = field(
        default=4, metadata={"help": "Most near-duplicate products per family (at most the varying key's values)."}
    )
    varying_keys: list[str] = field(
        default_factory=lambda: list(FAMILY_VARYING_KEYS),
        metadata={"help": f"Keys a family may vary in, one per family (of {', '.join(FAMILY_VARYING_KEYS)})."},
    )
    family_key_count: int = field(
        default=1,
        metadata={
            "help": "How many of --varying_keys one family varies at once: 1, or 2 for families of every pair of "
            "values (pattern x logo: up to 25 near-duplicates, so separating them moves a query across the ranks a "
            "Recall@k reward counts). 1 leaves the catalog byte-identical."
        },
    )
    logo_scale: float = field(
        default=0.13, metadata={"help": "The logo mark's radius as a fraction of the product (smaller: finer)."}
    )
    pattern_period: float = field(
        default=0.2, metadata={"help": "The texture's step as a fraction of the product (smaller: finer)."}
    )
    equal_ink: bool = field(
        default=False,
        metadata={
            "help": "Draw every pattern with the same mean colour and every logo shape with the same ink, so that only "
            "their detail tells them apart (a view too coarse for the detail sees one colour; a logo's presence "
            "still shows). Off leaves the catalog byte-identical."
        },
    )
    equal_ink_keys: list[str] = field(
        default_factory=lambda: ["pattern", "logo"],
        metadata={"help": "Which of pattern and logo --equal_ink evens out (the fair test's fourth draft: pattern)."},
    )
    test_fraction: float = field(default=0.3, metadata={"help": "Fraction of families put in the test split."})
    val_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the train families relabelled split='val': held out from stage 1 so that stage 2's RL "
            "meets products the encoder has not memorised. 0 leaves the catalog byte-identical."
        },
    )
    duplicate_sku_fraction: float = field(
        default=0.02,
        metadata={"help": "Fraction of train products re-listed under a new product_id (false negatives)."},
    )
    images_per_listing: int = field(
        default=1, metadata={"help": "Images per listing; > 1 writes an `images` list instead of `image`."}
    )
    clutter: bool = field(
        default=False,
        metadata={
            "help": "Shrink each product photo onto a busy scene of coloured shapes and record where it is in a `bbox` "
            "column (for product-region crops, afmrl.encoder.crops); drawn from its own random stream, so titles and "
            "attributes are those of the catalog without clutter. Off leaves the catalog byte-identical."
        },
    )
    teacher_omission_rate: float = field(
        default=0.15, metadata={"help": "Teacher drops each true attribute with this rate."}
    )
    teacher_error_rate: float = field(
        default=0.1, metadata={"help": "Teacher gives a wrong value for an attribute with this rate."}
    )
    teacher_sees: str = field(
        default="product",
        metadata={
            "help": "What the simulated teacher knows. `listing`: like an MLLM run on one listing, it reads the photo "
            "and "
            "the title, so brand and size (not drawn) appear only when that listing's title states them. "
            "`product`: it knows every true attribute of the product (an oracle for the invisible keys)."
        },
    )
    teacher_redundancy_rate: float = field(
        default=0.3,
        metadata={"help": "Teacher adds each non-discriminative key (condition, shipping, style) with this rate."},
    )
    teacher_confusions: str = field(
        default="",
        metadata={
            "help": "Recurring confusions of the teacher, `key:true>written,...` (e.g. `pattern:dotted>checked`): it "
            "writes the second value for the first with --teacher_confusion_rate, a habit SFT copies and a retrieval "
            "reward can undo. The written value is another value of the key (a merge: only perception undoes it) or "
            "a word the key otherwise never holds (`pattern:dotted>spotted`: a line alone shows it). Empty: none "
            "(the catalog byte-identical)."
        },
    )
    teacher_confusion_rate: float = field(
        default=0.0, metadata={"help": "How often the teacher makes each of its --teacher_confusions."}
    )
    title_silent_keys: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Keys no title ever states (e.g. `pattern logo`): near-duplicates that differ in what sellers do "
            "not write, so only the photo (or attributes) can tell them apart. Empty: titles as always (the catalog "
            "byte-identical); otherwise another world (later random draws shift)."
        },
    )
    title_key_rates: str = field(
        default="",
        metadata={
            "help": "How often a title states a key, `key:rate,...` (e.g. `pattern:0.1,logo:0.1`), in place of the "
            "usual rate: a word the embedder must read in a line is learnt where a title says it beside the photo, "
            "and a rare one leaks little. A --title_silent_keys key stays silent. Empty: the usual rates (the "
            "catalog byte-identical)."
        },
    )
    teacher_confusion_unit: str = field(
        default="listing",
        metadata={
            "help": "What a confusion is drawn for: `listing` (afresh for every listing) or `product` (once per SKU: "
            "a deterministic teacher confuses every photo of a given product alike, so listings of one SKU, "
            "duplicates included, agree)."
        },
    )
    exclude_products_of_seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Never draw a product (attribute vector) that a catalog of one of these seeds holds, for catalogs "
            "of up "
            "to --exclude_up_to products with the default family sizes: a pretraining corpus disjoint from the "
            "demo, test and benchmark catalogs. Empty leaves the catalog byte-identical."
        },
    )
    exclude_up_to: int = field(
        default=5000,
        metadata={"help": "With --exclude_products_of_seeds: how many products of each excluded seed are reserved."},
    )

    def __post_init__(self):
        checks = {
            "num_products": self.num_products >= 2,
            "image_size": self.image_size >= 16,
            "min_listings": 2 <= self.min_listings <= self.max_listings,
            "min_family_size": 1 <= self.min_family_size <= self.max_family_size,
            "max_family_size": all(k in FAMILY_VARYING_KEYS for k in self.varying_keys)
            and bool(self.varying_keys)
            and self.max_family_size <= _smallest_family_space(self.varying_keys, self.family_key_count),
            "family_key_count": self.family_key_count in (1, 2) and self.family_key_count <= len(self.varying_keys),
            "logo_scale": 0.0 < self.logo_scale <= 0.5,
            "pattern_period": 0.0 < self.pattern_period <= 0.5,
            "equal_ink_keys": bool(self.equal_ink_keys) and set(self.equal_ink_keys) <= {"pattern", "logo"},
            "teacher_confusion_rate": 0.0 <= self.teacher_confusion_rate <= 1.0,
            "teacher_confusions": _confusions_ok(self.teacher_confusions),
            "test_fraction": 0.0 <= self.test_fraction < 1.0,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
            "duplicate_sku_fraction": 0.0 <= self.duplicate_sku_fraction < 0.5,
            "images_per_listing": self.images_per_listing >= 1,
            "teacher_omission_rate": 0.0 <= self.teacher_omission_rate <= 1.0,
            "teacher_error_rate": 0.0 <= self.teacher_error_rate <= 1.0,
            "teacher_redundancy_rate": 0.0 <= self.teacher_redundancy_rate <= 1.0,
            "teacher_sees": self.teacher_sees in ("listing", "product"),
            "teacher_confusion_unit": self.teacher_confusion_unit in ("listing", "product"),
            "title_silent_keys": set(self.title_silent_keys) <= set(TITLE_OMISSION),
            "title_key_rates": _rates_ok(self.title_key_rates),
            "exclude_up_to": self.exclude_up_to >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid synthetic catalog argument(s) {bad}: need num_products >= 2, image_size >= 16, "
                "2 <= min_listings <= max_listings, 1 <= min_family_size <= max_family_size <= the values of every "
                f"varying key (varying_keys of {', '.join(FAMILY_VARYING_KEYS)}; of every pair of them with "
                "family_key_count 2, which is 1 or 2 and at most the varying keys), logo_scale and pattern_period in "
                "(0, 0.5], equal_ink_keys among pattern and logo, teacher_confusions as key:true>written (true a "
                "value of that key, written another), "
                "rates in [0, 1], teacher_sees and teacher_confusion_unit listing or product, "
                "title_silent_keys among the attribute keys, title_key_rates as key:rate with rates in [0, 1], "
                "test_fraction and val_fraction in [0, 1), "
                "duplicate_sku_fraction in [0, 0.5)"
            )


def _smallest_family_space(keys, count: int) -> int:
    """The fewest distinct members a family can have: the smallest value count of one varying key, or of a pair."""
    sizes = [len(ATTRIBUTE_VALUES.get(k, ())) for k in keys]
    if count == 1 or len(sizes) < 2:
        return min(sizes, default=0)
    return min(a * b for i, a in enumerate(sizes) for b in sizes[i + 1 :])


def parse_confusions(text: str) -> dict[str, dict[str, str]]:
    """`"pattern:dotted>checked,logo:circle>none"` -> {"pattern": {"dotted": "checked"}, "logo": {"circle": "none"}}"""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, pair = item.partition(":")
        true, _, written = pair.partition(">")
        out.setdefault(key.strip(), {})[true.strip()] = written.strip()
    return out


def parse_rates(text: str) -> dict[str, float]:
    """`"pattern:0.1,logo:0.2"` -> {"pattern": 0.1, "logo": 0.2}"""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, rate = item.partition(":")
        out[key.strip()] = float(rate)
    return out


def _rates_ok(text: str) -> bool:
    try:
        rates = parse_rates(text)
    except ValueError:
        return False
    return all(key in TITLE_OMISSION and 0.0 <= rate <= 1.0 for key, rate in rates.items())


def _confusions_ok(text: str) -> bool:
    try:
        confusions = parse_confusions(text)
    except ValueError:
        return False
    return all(
        key in ATTRIBUTE_VALUES and all(a in ATTRIBUTE_VALUES[key] and b and a != b for a, b in pairs.items())
        for key, pairs in confusions.items()
    )  # fmt: skip


def vocabulary_corpus() -> list[str]:
    """Texts covering every word the catalog, its titles and the prompts can contain.

    Used to train the tiny models' tokenizer so that the embedded default tokenises compactly.
    """
    texts = list(ATTRIBUTE_PROMPT_SENTENCES) + list(FILLER_WORDS)
    for key, values in list(ATTRIBUTE_VALUES.items()) + list(REDUNDANT_VALUES.items()):
        texts += [f"{key}: {value}" for value in values]
    for synonyms in CATEGORY_SYNONYMS.values():
        texts += list(synonyms)
    texts += [f"{p} pattern" for p in ATTRIBUTE_VALUES["pattern"]] + ["with trim", "logo", "size", "plain"]
    return texts


# ---------------------------------------------------------------- attribute sampling


def _choice(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def _sample_families(
    cfg: SyntheticCatalogConfig, rng: np.random.Generator, num_products: int, reserved: set | frozenset = frozenset()
):
    """Return a list of families, each a list of attribute dicts (distinct full vectors, none in ``reserved``)."""
    families, seen = [], set(reserved)
    while sum(len(f) for f in families) < num_products:
        remaining = num_products - sum(len(f) for f in families)
        size = min(int(rng.integers(cfg.min_family_size, cfg.max_family_size + 1)), remaining)
        for _attempt in range(100):
            base = {key: _choice(rng, values) for key, values in ATTRIBUTE_VALUES.items()}
            if cfg.family_key_count == 1:
                key = _choice(rng, cfg.varying_keys)
                pool = [{key: v} for v in ATTRIBUTE_VALUES[key]]
            else:  # every pair of values of two varying keys
                first, second = (cfg.varying_keys[i] for i in rng.permutation(len(cfg.varying_keys))[:2])
                pool = [{first: a, second: b} for a in ATTRIBUTE_VALUES[first] for b in ATTRIBUTE_VALUES[second]]
            picks = rng.permutation(len(pool))[:size]
            members = [{**base, **pool[i]} for i in picks]
            signatures = [tuple(m[k] for k in ATTRIBUTE_KEYS) for m in members]
            if not any(s in seen for s in signatures):
                break
        else:  # pragma: no cover - only with absurd num_products for this attribute space
            raise ValueError(f"cannot draw {num_products} distinct products from the attribute space")
        seen.update(signatures)
        families.append(members)
    return families


def _teacher_attributes(
    cfg: SyntheticCatalogConfig, rng: np.random.Generator, true_attrs: dict, title_keys: set[str]
) -> dict:
    out, confusions = {}, parse_confusions(cfg.teacher_confusions)
    for key in ATTRIBUTE_KEYS:
        omit, wrong = rng.random(), rng.random()  # drawn in every mode: the other columns keep their bytes
        if omit < cfg.teacher_omission_rate:
            continue
        value = true_attrs[key]
        if wrong < cfg.teacher_error_rate:
            others = [v for v in ATTRIBUTE_VALUES[key] if v != value]
            value = _choice(rng, others)
        if cfg.teacher_confusion_rate > 0:  # a habit, not a slip: the same wrong value for the same true one
            draw = rng.random()  # drawn in either unit: the other columns keep their bytes
            if cfg.teacher_confusion_unit == "product":
                draw = _product_draw(cfg.seed, true_attrs, key)
            habit = draw < cfg.teacher_confusion_rate
            value = confusions.get(key, {}).get(true_attrs[key], value) if habit else value
        if cfg.teacher_sees == "listing" and key in INVISIBLE_KEYS and key not in title_keys:
            continue  # not in the photo, not in this title: a teacher reading the listing cannot know it
        out[key] = value
    for key, values in REDUNDANT_VALUES.items():
        add, pick = rng.random(), _choice(rng, values)
        if add < cfg.teacher_redundancy_rate:
            out[key] = pick
    return out


def _product_draw(seed: int, true_attrs: dict, key: str) -> float:
    """A uniform draw in [0, 1) fixed by the seed, the product's attribute vector and the key (not by the stream)."""
    text = json.dumps([seed, [true_attrs[k] for k in ATTRIBUTE_KEYS], key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def _title(rng: np.random.Generator, attrs: dict, silent=(), rates=None) -> tuple[str, set[str]]:
    """A seller's title and the keys it states (never a ``silent`` one; a key of ``rates`` with that probability)."""
    phrases, rates = [], rates or {}
    draws = {key: rng.random() for key in TITLE_OMISSION}  # drawn for every key: the stream is kept
    keep = {
        key: u < rates[key] if key in rates else u >= p
        for (key, p), u in zip(TITLE_OMISSION.items(), draws.values(), strict=True)
    }
    keep = {key: kept and key not in silent for key, kept in keep.items()}
    if keep["brand"]:
        phrases.append(attrs["brand"].capitalize())
    if keep["color"]:
        phrases.append(attrs["color"])
    if keep["pattern"]:
        phrases.append("plain" if attrs["pattern"] == "solid" else attrs["pattern"])
    if keep["category"]:
        phrases.append(_choice(rng, CATEGORY_SYNONYMS[attrs["category"]]))
    if keep["secondary_color"]:
        phrases.append(f"with {attrs['secondary_color']} trim")
    if keep["logo"] and attrs["logo"] != "none":
        phrases.append(f"{attrs['logo']} logo")
    if keep["size"]:
        phrases.append(f"size {attrs['size']}")
    order = rng.permutation(len(phrases))
    words = [phrases[i] for i in order]
    for _ in range(int(rng.integers(1, 4))):
        filler = _choice(rng, FILLER_WORDS)
        words.insert(int(rng.integers(len(words) + 1)), filler)
    stated = {key for key, kept in keep.items() if kept and not (key == "logo" and attrs["logo"] == "none")}
    return " ".join(words), stated


# ---------------------------------------------------------------- catalog


def _duplicate_count(cfg: SyntheticCatalogConfig) -> int:
    return int(round(cfg.duplicate_sku_fraction * cfg.num_products * (1 - cfg.test_fraction)))


def products_of_seed(seed: int, num_products: int) -> set[tuple]:
    """The attribute vectors (values in ``ATTRIBUTE_KEYS`` order) of the catalog with this seed and
    ``num_products`` at the default family sizes. Families are the generator's first draws and are
    drawn one after another, so every smaller catalog of the same seed holds a subset of these."""
    cfg = SyntheticCatalogConfig(output_dir="", num_products=num_products, seed=seed)
    families = _sample_families(cfg, np.random.default_rng(seed), num_products - _duplicate_count(cfg))
    return {tuple(m[k] for k in ATTRIBUTE_KEYS) for members in families for m in members}


def make_synthetic_catalog(output_dir: str | Path | None = None, **kwargs) -> Path:
    """Write a synthetic catalog (``catalog.jsonl`` + ``images/``) and return its directory.

    Keyword arguments are the fields of ``SyntheticCatalogConfig`` (num_products, seed, ...).
    Alternatively pass ``config=SyntheticCatalogConfig(...)``.
    """
    cfg = kwargs.pop("config", None)
    if cfg is None:
        cfg = SyntheticCatalogConfig(output_dir=str(output_dir), **kwargs)
    elif kwargs or output_dir is not None and str(output_dir) != cfg.output_dir:
        raise ValueError("pass either config=SyntheticCatalogConfig(...) or keyword arguments, not both")
    out = Path(cfg.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)

    num_dup = _duplicate_count(cfg)
    reserved = set().union(*(products_of_seed(s, cfg.exclude_up_to) for s in cfg.exclude_products_of_seeds))
    families = _sample_families(cfg, rng, cfg.num_products - num_dup, reserved)
    order = rng.permutation(len(families))
    num_test = int(round(cfg.test_fraction * len(families)))
    if cfg.test_fraction > 0 and len(families) >= 2:
        num_test = min(max(num_test, 1), len(families) - 1)
    test_families = {int(i) for i in order[:num_test]}

    products = []  # (product_id, family_id, split, true attributes)
    for f, members in enumerate(families):
        split = "test" if f in test_families else "train"
        for attrs in members:
            products.append((f"P{len(products):05d}", f"F{f:04d}", split, attrs))
    train_products = [p for p in products if p[2] == "train"]
    for k in rng.permutation(len(train_products))[:num_dup]:
        _, family_id, _, attrs = train_products[int(k)]
        products.append((f"P{len(products):05d}", family_id, "train", dict(attrs)))

    clutter_rng = np.random.default_rng([cfg.seed, 2]) if cfg.clutter else None  # the main stream stays untouched
    rows = []
    for product_id, family_id, split, attrs in products:
        for _ in range(int(rng.integers(cfg.min_listings, cfg.max_listings + 1))):
            listing_id = f"L{len(rows):06d}"
            paths, boxes = [], []
            for v in range(cfg.images_per_listing):
                rel = f"images/{listing_id}.png" if cfg.images_per_listing == 1 else f"images/{listing_id}_{v}.png"
                image = render_product_image(
                    attrs,
                    rng,
                    cfg.image_size,
                    logo_scale=cfg.logo_scale,
                    pattern_period=cfg.pattern_period,
                    equal_ink=cfg.equal_ink,
                    equal_ink_keys=tuple(cfg.equal_ink_keys),
                )
                if clutter_rng is not None:
                    image, box = place_on_clutter(image, clutter_rng)
                    boxes.append(box)
                image.save(out / rel, format="PNG")
                paths.append(rel)
            title, title_keys = _title(rng, attrs, cfg.title_silent_keys, parse_rates(cfg.title_key_rates))
            row = {"listing_id": listing_id, "product_id": product_id, "title": title}
            if cfg.images_per_listing == 1:
                row["image"] = paths[0]
            else:
                row["images"] = paths
            if boxes:
                row["bbox"] = boxes[0]  # the product's region in the listing's first image
            row.update(
                category=attrs["category"],
                attributes=_teacher_attributes(cfg, rng, attrs, title_keys),
                true_attributes={key: attrs[key] for key in ATTRIBUTE_KEYS},
                family_id=family_id,
                split=split,
            )
            rows.append(row)

    if cfg.val_fraction > 0:  # its own random stream: every other draw, hence every other byte, is unchanged
        train_families = sorted({r["family_id"] for r in rows if r["split"] == "train"})
        val_rng = np.random.default_rng([cfg.seed, 1])
        chosen = val_rng.permutation(len(train_families))[: int(round(cfg.val_fraction * len(train_families)))]
        val_families = {train_families[int(i)] for i in chosen}
        for row in rows:
            if row["family_id"] in val_families:
                row["split"] = "val"
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    (out / "catalog.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "generation.json").write_text(json.dumps(asdict(cfg) | {"output_dir": None}, indent=2) + "\n")
    return out
