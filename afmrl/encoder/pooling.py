"""Pooling: the hidden state of a listing's last token, L2-normalised, is its embedding.

A causal language model's last token has attended to the whole input, so its final hidden state
summarises the listing; VLM2Vec (Jiang et al., arXiv 2410.05160) and the AFMRL paper read Qwen2-VL
this way. ``afmrl.encoder.inputs`` pads on the right and ends every listing on ``<|im_end|>``, so the
last real token of row i sits at ``attention_mask[i].sum() - 1``.

    embedding = last_token_pool(outputs.last_hidden_state, batch["attention_mask"])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["last_token_pool", "last_token_states"]


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) float32: each row's hidden state at its last non-padding token (right padding)."""
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``last_token_states``, L2-normalised: the product embedding."""
    return F.normalize(last_token_states(hidden, attention_mask), dim=-1)
