"""``AGCLTrainer``: a ``transformers.Trainer`` that trains a ``ProductEncoder`` with the AGCL loss.

Everything a Trainer does (accelerate, DeepSpeed, gradient accumulation, checkpoints, logging)
stays as it is; this class only says how a batch of (query, positive) pairs becomes a loss, and
saves the encoder in its own format (adapter or backbone + ``encoder_config.json``) so that
``ProductEncoder.from_pretrained`` and the stage-2 reward can load any checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial

import datasets
import torch
from transformers import Trainer, TrainerCallback

from afmrl.attributes import BM25Scorer, format_attributes
from afmrl.encoder.model import ProductEncoder
from afmrl.encoder.moe import routing_entropy_loss
from agcl.config import AGCLConfig
from agcl.data import AGCLCollator, GroupedBatchSampler, ProductPairDataset
from agcl.grad_cache import cached_contrastive_backward
from agcl.loss import AGCLLoss

BM25_FILE = "bm25_idf.json"


def check_attribute_options(args: AGCLConfig, catalog: datasets.Dataset) -> None:
    """Fail before training when an option needs an attribute column the catalog lacks."""
    needs = []
    if args.hard_negative_weighting:
        needs.append("--hard_negative_weighting")
    if args.false_negative_filter == "attribute":
        needs.append("--false_negative_filter attribute")
    if args.query_attribute_probability > 0:
        needs.append("--query_attribute_probability")
    if args.candidate_attribute_probability > 0:
        needs.append("--candidate_attribute_probability")
    if not needs:
        return
    column = args.attribute_column
    if column is None or column not in catalog.column_names:
        raise ValueError(
            f"{', '.join(needs)} need(s) an attribute column, but the catalog has no column {column!r} "
            f"(columns: {catalog.column_names}). Add attributes with recipes/extract_attributes.py, set "
            "--attribute_column, or turn the option off (e.g. --hard_negative_weighting false, "
            "--query_attribute_probability 0)."
        )


class _PairEpochCallback(TrainerCallback):
    """Tell the pair dataset which epoch starts (also right after a resume in the middle of one);
    accelerate forwards ``set_epoch`` to a dataset only when the sampler lacks it."""

    def __init__(self, pairs: ProductPairDataset):
        self.pairs = pairs

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.pairs.set_epoch(math.floor(state.epoch + 1e-6))


class AGCLTrainer(Trainer):
    """Trainer over pairs of listings of the same product, with the AGCL contrastive loss."""

    def __init__(self, model: ProductEncoder, args: AGCLConfig, train_dataset: datasets.Dataset, **kwargs):
        check_attribute_options(args, train_dataset)
        if getattr(model, "moe", None) is not None and args.gradient_cache_chunk_size:
            raise ValueError(
                "--gradient_cache_chunk_size and an encoder with modality experts (moe_experts > 0) do "
                "not go together yet (the routing regulariser needs the whole batch): turn one off"
            )
        self.catalog = train_dataset
        attribute_column = args.attribute_column if args.attribute_column in train_dataset.column_names else None
        self.bm25 = None
        if args.hard_negative_weighting:
            # IDF from the training set's attribute texts, as in the paper.
            corpus = [format_attributes(a) for a in train_dataset[attribute_column]]
            self.bm25 = BM25Scorer(corpus, k1=args.bm25_k1, b=args.bm25_b)
        self.loss_fn = AGCLLoss(
            temperature=args.temperature,
            hard_negative_weighting=args.hard_negative_weighting,
            weighting_scale=args.weighting_scale,
            weight_positive=args.weight_positive,
            bm25=partial(self.bm25.score, normalize=args.bm25_normalization) if self.bm25 is not None else None,
            false_negative_filter=args.false_negative_filter,
            filter_threshold=args.filter_threshold,
            filter_margin=args.filter_margin,
            dynamic_kappa=args.dynamic_kappa,
            dynamic_threshold=args.dynamic_threshold,
            dynamic_margin_start=args.dynamic_margin_start,
            dynamic_margin_end=args.dynamic_margin_end,
            dynamic_margin_decay_steps=args.dynamic_margin_decay_steps,
            symmetric=args.symmetric,
            memory_queue_size=args.memory_queue_size,
            intra_product_weight=args.intra_product_weight,
        )
        collator = kwargs.pop("data_collator", None) or AGCLCollator(
            model,
            train_dataset,
            attribute_column=attribute_column,
            signature_keys=args.signature_keys,
            query_attribute_probability=args.query_attribute_probability,
            candidate_attribute_probability=args.candidate_attribute_probability,
            attribute_key_probability=args.attribute_key_probability,
            with_modalities=args.intra_product_weight > 0,
            modality_text=args.intra_product_text,
            seed=args.seed,
        )
        pairs = ProductPairDataset(train_dataset, seed=args.seed)
        super().__init__(model=model, args=args, train_dataset=pairs, data_collator=collator, **kwargs)
        self.add_callback(_PairEpochCallback(pairs))

    def _get_train_sampler(self, train_dataset=None):
        grouping = self.args.batch_grouping
        if not grouping:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return GroupedBatchSampler(dataset.product_groups(grouping), seed=self.args.seed)

    # ------------------------------------------------------------------ loss

    def _loss_kwargs(self, inputs: dict) -> dict:
        return {
            "product_ids": inputs["product_ids"],
            "query_attributes": inputs["query_attributes"],
            "candidate_attributes": inputs["candidate_attributes"],
            "query_signatures": inputs["query_signatures"],
            "candidate_signatures": inputs["candidate_signatures"],
            "step": self.state.global_step,
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        encoder = self.accelerator.unwrap_model(model)
        routing = []

        def embed(batch):
            out = model(**batch)
            if encoder.moe is not None:
                routing.append(encoder.last_routing)
            return out

        extra = {}
        if "query_image_only" in inputs:
            # Before the full passes: under DDP (find_unused_parameters) the last forward decides which parameters
            # count as unused, and a text-only last pass would mark the vision tower ready twice.
            extra = {
                "image_embeddings": embed(inputs["query_image_only"]),
                "text_embeddings": embed(inputs["query_text_only"]),
            }
        query = embed(inputs["query"])
        candidate = embed(inputs["candidate"])
        loss = self.loss_fn(query, candidate, **self._loss_kwargs(inputs), **extra)
        if routing and encoder.config.moe_entropy_weight:
            loss = loss + encoder.config.moe_entropy_weight * routing_entropy_loss(torch.cat(routing))
        return (loss, {"query": query, "candidate": candidate}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        chunk = self.args.gradient_cache_chunk_size
        if not chunk:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_deepspeed_enabled or self.args.gradient_accumulation_steps > 1 or "query_image_only" in inputs:
            raise ValueError(
                "--gradient_cache_chunk_size works without DeepSpeed, gradient accumulation and "
                "--intra_product_weight; turn one of them off"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        q_chunks = self.model.split_inputs(inputs["query"], chunk)
        c_chunks = self.model.split_inputs(inputs["candidate"], chunk)
        loss = cached_contrastive_backward(
            lambda batch: model(**batch), q_chunks, c_chunks, self.loss_fn, **self._loss_kwargs(inputs)
        )
        return loss.detach()

    # ------------------------------------------------------------------ saving

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Restore the encoder's weights from a checkpoint written by ``_save`` (its own format).

        transformers' default loader expects the module's own state-dict keys and loads
        non-strictly, so on a ``ProductEncoder`` checkpoint (backbone or adapter keys) it would
        silently load nothing; here every saved tensor must match.
        """
        encoder = model if model is not None else self.model
        self._load_backbone_from_checkpoint(encoder, resume_from_checkpoint)
        encoder.load_heads(resume_from_checkpoint, error=ValueError)

    @staticmethod
    def _load_backbone_from_checkpoint(encoder, resume_from_checkpoint):
        path = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if hasattr(encoder.model, "peft_config"):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            if not os.path.isfile(path):
                raise ValueError(f"{resume_from_checkpoint}: no adapter_model.safetensors for this LoRA encoder")
            result = set_peft_model_state_dict(encoder.model, load_file(path))
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{resume_from_checkpoint}: adapter tensors that fit no layer: {unexpected[:5]}")
            return
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")):
            raise ValueError(f"{resume_from_checkpoint}: no model.safetensors for this fully fine-tuned encoder")
        # The backbone was saved with save_pretrained (checkpoint key names, tied weights once): read it
        # back the same way, on CPU, and copy every tensor strictly into the live model.
        backbone = encoder.backbone  # an image-text-to-text model, or a CLIP/SigLIP dual encoder: its own class
        saved = type(backbone).from_pretrained(resume_from_checkpoint, dtype=backbone.dtype)
        backbone.load_state_dict(saved.state_dict(), strict=True)

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        if self.bm25 is not None:
            with open(os.path.join(output_dir, BM25_FILE), "w", encoding="utf-8") as f:
                json.dump(self.bm25.to_dict(), f)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
