"""AGCL as a sentence-transformers loss: ``SentenceTransformerTrainer`` trains any ST model with it.

AFMRL (Findings of ACL 2026, arXiv 2604.20135), stage 1: InfoNCE whose logits are re-weighted by the BM25 similarity
of the listings' attribute texts, with false negatives filtered (``agcl.loss.AGCLLoss``, the formula and every
option). This class has sentence-transformers' loss interface (the model, then the loss's own arguments; ``forward``
takes the trainer's ``sentence_features`` and ``labels``) and computes exactly ``AGCLLoss`` on the model's normalised
embeddings of the first two columns (anchor, positive: two listings of one product). Attribute texts are not model
inputs, so they come from dataset columns given to the loss, and the training dataset's ``label`` column says which
row a pair is (``training_columns`` makes that dataset). No other part of this package is needed.

    pairs = Dataset.from_dict({"anchor": [...], "positive": [...], "anchor_attributes": [...],
                               "positive_attributes": [...], "product_id": [...]})
    loss = AGCLSentenceTransformerLoss(model, pairs["anchor_attributes"], pairs["positive_attributes"],
                                       product_ids=pairs["product_id"], false_negative_filter="attribute")
    SentenceTransformerTrainer(model=model, train_dataset=AGCLSentenceTransformerLoss.training_columns(pairs),
                               loss=loss).train()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agcl.loss import AGCLLoss

__all__ = ["AGCLSentenceTransformerLoss"]


class AGCLSentenceTransformerLoss(nn.Module):
    """``AGCLLoss`` over an ST model's embeddings of (anchor, positive) pairs.

    Args:
        model: the ``SentenceTransformer`` being trained (anything whose ``model(features)["sentence_embedding"]``
            embeds one column's features).
        attributes: attribute text of each dataset row's anchor (the BM25 side of the query).
        candidate_attributes: attribute text of each row's positive (default: ``attributes``).
        product_ids: each row's product id (the "attribute" filter masks in-batch listings of the same product).
        signatures: per row, (anchor, positive) attribute signatures for the "attribute" filter, if used.
        agcl_options: ``AGCLLoss``'s own arguments (temperature, hard_negative_weighting, false_negative_filter,
            bm25, symmetric, memory_queue_size, ...). The dynamic filter's step counts training forwards (one
            per optimiser step without gradient accumulation).
    """

    def __init__(
        self,
        model: nn.Module,
        attributes: Sequence[str | None],
        candidate_attributes: Sequence[str | None] | None = None,
        *,
        product_ids: Sequence[str] | None = None,
        signatures: Sequence[tuple[str | None, str | None]] | None = None,
        **agcl_options,
    ):
        super().__init__()
        self.model = model
        self.attributes = ["" if a is None else str(a) for a in attributes]
        candidates = attributes if candidate_attributes is None else candidate_attributes
        self.candidate_attributes = ["" if a is None else str(a) for a in candidates]
        self.product_ids = None if product_ids is None else [str(p) for p in product_ids]
        self.signatures = None if signatures is None else [tuple(s) for s in signatures]
        for name, column in (("candidate_attributes", self.candidate_attributes), ("product_ids", self.product_ids),
                             ("signatures", self.signatures)):  # fmt: skip
            if column is not None and len(column) != len(self.attributes):
                raise ValueError(f"{name} has {len(column)} rows, attributes {len(self.attributes)}")
        self.agcl_options = dict(agcl_options)
        self.agcl = AGCLLoss(**agcl_options)
        self.step = 0

    @staticmethod
    def training_columns(pairs, anchor: str = "anchor", positive: str = "positive"):
        """The dataset the trainer sees: the two input columns and ``label`` = the row's index into the loss's
        attribute columns (the trainer would embed any other column as a model input)."""
        return pairs.select_columns([anchor, positive]).add_column("label", list(range(len(pairs))))

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"AGCL needs (anchor, positive) columns, got {len(features)}")
        embeddings = [self.model(f)["sentence_embedding"] for f in features[:2]]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError("the training dataset needs a `label` column of row indices: use training_columns()")
        rows = labels.long().tolist()
        if rows and not 0 <= min(rows) <= max(rows) < len(self.attributes):
            raise ValueError(f"label {max(rows)} is not a row of the {len(self.attributes)} attribute rows")
        query, candidate = (F.normalize(e.float(), dim=-1) for e in embeddings[:2])
        kwargs = {
            "query_attributes": [self.attributes[r] for r in rows],
            "candidate_attributes": [self.candidate_attributes[r] for r in rows],
            "step": self.step,
        }
        if self.product_ids is not None:
            kwargs["product_ids"] = [self.product_ids[r] for r in rows]
        if self.signatures is not None:
            kwargs["query_signatures"] = [self.signatures[r][0] for r in rows]
            kwargs["candidate_signatures"] = [self.signatures[r][1] for r in rows]
        self.agcl.train(self.training)
        loss = self.agcl(query, candidate, **kwargs)
        if self.training:
            self.step += 1
        return loss

    def get_config_dict(self) -> dict:
        return {key: value for key, value in self.agcl_options.items() if key != "bm25"}

    @property
    def citation(self) -> str:
        return """@inproceedings{afmrl2026,
    title = {Attribute-Enhanced Fine-Grained Multimodal Representation Learning for E-commerce},
    booktitle = {Findings of the Association for Computational Linguistics: ACL 2026},
    year = {2026},
    eprint = {2604.20135},
    archivePrefix = {arXiv}
}"""
