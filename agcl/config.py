"""Configuration of stage 1: the AGCL training arguments and the recipe's script arguments.

``AGCLConfig`` extends ``transformers.TrainingArguments`` the way TRL's ``GRPOConfig`` does, so
every Trainer flag (learning rate, accelerate/DeepSpeed, logging, checkpoints) works unchanged.
The backbone and its LoRA settings come from ``trl.ModelConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from agcl.loss import FILTERS as FALSE_NEGATIVE_FILTERS  # the loss defines its filters; the flag offers those

INTRA_PRODUCT_TEXTS = ("title", "attributes", "title+attributes")


@dataclass
class AGCLConfig(TrainingArguments):
    """Training arguments of ``AGCLTrainer``: Trainer's plus the AGCL loss and data options."""

    temperature: float = field(
        default=0.02, metadata={"help": "InfoNCE temperature τ (VLM2Vec's 0.02; AFMRL does not report its τ)."}
    )
    hard_negative_weighting: bool = field(
        default=True, metadata={"help": "Add λ·tanh(BM25) of the attribute texts to every logit (AGCL's weighting)."}
    )
    weighting_scale: float = field(default=1.0, metadata={"help": "λ: scale of the tanh(BM25) logit bonus."})
    weight_positive: bool = field(
        default=True,
        metadata={
            "help": "Give the positive its tanh(BM25) bonus too (the formula as written). False weights only "
            "the negatives: an attribute-aware margin for near-duplicates (see AGCLLoss)."
        },
    )
    false_negative_filter: str = field(
        default="attribute",
        metadata={
            "help": "False-negative filter: none, absolute, relative, attribute or dynamic.",
            "choices": list(FALSE_NEGATIVE_FILTERS),
        },
    )
    filter_threshold: float = field(
        default=0.9, metadata={"help": "`absolute` filter: mask negatives with cosine > this."}
    )
    filter_margin: float = field(
        default=0.1, metadata={"help": "`relative` filter: mask negatives with cosine > positive's cosine − margin."}
    )
    dynamic_kappa: float = field(
        default=20.0, metadata={"help": "`dynamic` filter: sharpness κ of σ(κ(s_ip − s_in − m))."}
    )
    dynamic_threshold: float = field(
        default=0.6, metadata={"help": "`dynamic` filter: mask negatives with φ below this."}
    )
    dynamic_margin_start: float = field(default=0.2, metadata={"help": "`dynamic` filter: margin m at step 0."})
    dynamic_margin_end: float = field(default=0.0, metadata={"help": "`dynamic` filter: margin m after the decay."})
    dynamic_margin_decay_steps: int = field(
        default=1000, metadata={"help": "`dynamic` filter: steps of linear margin decay."}
    )
    symmetric: bool = field(default=False, metadata={"help": "Average the query→candidate and candidate→query losses."})
    memory_queue_size: int = field(
        default=0, metadata={"help": "Keep this many past candidate embeddings as extra negatives (MOON); 0 = off."}
    )
    intra_product_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the image↔text alignment term inside each listing (MOON2.0); 0 = off."},
    )
    intra_product_text: str = field(
        default="title",
        metadata={
            "help": "The text side of the image↔text term: the listing's `title`, its whole `attributes` line, or "
            "`title+attributes`. `attributes` ties attribute words to the photo in the embedding, as an "
            "embedder pretrained on image-text pairs has them (a listing without attributes uses its title).",
            "choices": list(INTRA_PRODUCT_TEXTS),
        },
    )
    gradient_cache_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Encode the batch in chunks of this size with GradCache: same loss and gradients, "
            "activation memory of one chunk. None = encode the batch at once."
        },
    )
    bm25_normalization: str = field(
        default="self",
        metadata={
            "help": "`self`: divide BM25 by the query's score against itself before tanh (raw BM25 on attribute "
            "text saturates tanh, making the weight constant); `none`: the literal formula.",
            "choices": ["self", "none"],
        },
    )
    bm25_k1: float = field(default=1.2, metadata={"help": "BM25 k1 (term-frequency saturation)."})
    bm25_b: float = field(default=0.75, metadata={"help": "BM25 b (length normalisation)."})
    attribute_column: str | None = field(
        default="attributes",
        metadata={
            "help": "Catalog column of attribute dicts for BM25 weighting, the attribute filter and query enrichment."
        },
    )
    signature_keys: list[str] | None = field(
        default=None,
        metadata={"help": "Attribute keys whose values identify a SKU for the `attribute` filter (default: all keys)."},
    )
    batch_grouping: str | None = field(
        default=None,
        metadata={
            "help": "Keep products of one group together in batches so near-duplicates meet as in-batch hard "
            "negatives (MOON): a column (`category`) or attribute keys (`attributes:category,brand`). "
            "Groups are packed several to a batch. None: random batches."
        },
    )
    query_attribute_probability: float = field(
        default=0.5,
        metadata={
            "help": "Probability of appending a query's attribute text to its input during training, so the "
            "encoder uses attributes when a query has them (stage 2) and works without them."
        },
    )
    candidate_attribute_probability: float = field(
        default=0.0,
        metadata={
            "help": "Probability of appending the positive's attribute text to its input (drawn independently "
            "of the query's), for galleries that carry attributes too (an annotated catalog; stage 2's "
            "--gallery_attributes). 0 keeps candidates as image + title."
        },
    )
    attribute_key_probability: float = field(
        default=1.0,
        metadata={
            "help": "Keep each key of an appended attribute line with this probability (drawn per pair, side "
            "and key), so the encoder reads any subset of keys, as a generator that names only what it "
            "is sure of writes (RL shortens attribute lists in the paper). 1 appends whole lines."
        },
    )
    # Trainer defaults that differ for contrastive training.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every column (pairs are built by the collator)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    save_safetensors: bool = field(default=True, metadata={"help": "Always safetensors."})

    def __post_init__(self):
        if self.false_negative_filter not in FALSE_NEGATIVE_FILTERS:
            raise ValueError(
                f"--false_negative_filter {self.false_negative_filter!r} is not one of {list(FALSE_NEGATIVE_FILTERS)}"
            )
        if not 0.0 <= self.query_attribute_probability <= 1.0:
            raise ValueError("--query_attribute_probability must be in [0, 1]")
        if not 0.0 <= self.candidate_attribute_probability <= 1.0:
            raise ValueError("--candidate_attribute_probability must be in [0, 1]")
        if not 0.0 < self.attribute_key_probability <= 1.0:
            raise ValueError("--attribute_key_probability must be in (0, 1]")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
        if self.intra_product_text not in INTRA_PRODUCT_TEXTS:
            raise ValueError(
                f"--intra_product_text {self.intra_product_text!r} is not one of {list(INTRA_PRODUCT_TEXTS)}"
            )
        super().__post_init__()


@dataclass
class AGCLScriptArguments:
    """What to train on: the recipe's own arguments (the model comes from trl.ModelConfig)."""

    catalog: str = field(
        default="embedded",
        metadata={
            "help": "Catalog directory, save_to_disk directory or hub id; `embedded` builds the synthetic catalog."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of the catalog to train on."})
    eval_split: str | None = field(
        default="test", metadata={"help": "Split to evaluate on after training (`none`: skip)."}
    )
    embedded_num_products: int = field(default=600, metadata={"help": "Size of the embedded synthetic catalog."})
    embedded_seed: int = field(default=0, metadata={"help": "Seed of the embedded synthetic catalog."})
    embedded_image_size: int = field(default=64, metadata={"help": "Image side (pixels) of the embedded catalog."})
    cache_dir: str = field(
        default="outputs/embedded", metadata={"help": "Where the embedded catalog and tiny models are built."}
    )
    instruction: str | None = field(default=None, metadata={"help": "Encoder instruction (default: the encoder's)."})
    init_encoder: str | None = field(
        default=None,
        metadata={
            "help": "Continue training a saved encoder directory (e.g. an InfoNCE warm start, or CIT's "
            "retraining); its backbone, LoRA, prompt, crop and expert settings are kept: the model flags are "
            "ignored, and a --crop_views / --moe_experts / --guided_moe_layers that differs from the saved one is "
            "refused."
        },
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the vision tower frozen."})
    image_weight: float = field(
        default=0.5,
        metadata={
            "help": "A CLIP/SigLIP backbone (a dual encoder, found from its config: afmrl.encoder.dual): the image "
            "embedding's weight in a listing's fusion w·image + (1-w)·text."
        },
    )
    crop_views: bool = field(
        default=False,
        metadata={
            "help": "The encoder also sees each listing's product-region crop (the catalog's `bbox` column; MOON, "
            "afmrl.encoder.crops). Saved with the encoder, so evaluation and the RAR reward crop the same way."
        },
    )
    image_max_side: int = field(
        default=0,
        metadata={
            "help": "The encoder's view: every photo downscaled so that its longer side is at most this many pixels "
            "(0: as given; e.g. 56 for 4 image tokens of a 112 px catalog). Saved with the encoder."
        },
    )
    save_sentence_transformer: bool = field(
        default=False,
        metadata={
            "help": "Also write OUTPUT_DIR/sentence-transformer: the trained encoder as a plain sentence-transformers "
            "model (SentenceTransformer(dir) loads it with no package code; afmrl.encoder.st_export)."
        },
    )
    moe_experts: int = field(
        default=0,
        metadata={
            "help": "Modality-aware experts on the embedding, routed by image / text / image+text (MOON2.0); 0 = off. "
            "Saved with the encoder."
        },
    )
    moe_entropy_weight: float = field(
        default=0.01,
        metadata={"help": "Weight of the routing entropy regulariser (afmrl.encoder.moe.routing_entropy_loss)."},
    )
    guided_moe_layers: int = field(
        default=0,
        metadata={
            "help": "MOON's guided experts in the last N language-model layers: image, category and attribute tokens "
            "each get a dedicated feed-forward expert (afmrl.encoder.guided_moe); 0 = off. Saved with the encoder."
        },
    )
    title_column: str = field(
        default="title",
        metadata={
            "help": "Column read as the listing's title in training, e.g. `enriched_title` written by "
            "extract_attributes.py --task title (MOON2.0's title co-augmentation); a row where it is null keeps "
            "its own title (counted in the log). Evaluation always reads `title`."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the backbone's own code from the hub to run (off: code execution)."}
    )

    def __post_init__(self):
        if self.moe_experts < 0:
            raise ValueError(f"--moe_experts must be >= 0 (0 = off), got {self.moe_experts}")
        if self.guided_moe_layers < 0:
            raise ValueError(f"--guided_moe_layers must be >= 0 (0 = off), got {self.guided_moe_layers}")
        if self.moe_entropy_weight < 0:
            raise ValueError(f"--moe_entropy_weight must be >= 0, got {self.moe_entropy_weight}")
