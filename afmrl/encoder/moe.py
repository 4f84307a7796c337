"""Modality-aware mixture of experts on the product embedding (MOON2.0, arXiv 2511.12449).

MOON2.0 routes each input to experts by its *modality composition*: a listing seen as image only,
as text only, or as image and text is a different kind of input, and experts that specialise on
each keep one modality from dominating the shared space. Here the experts sit on the encoder's
pooled embedding ``h`` (the backbone is untouched), as a residual:

    g = softmax(W_r [h ; onehot(m)] + b_r)         m in {text, image, image+text}
    e = normalize(h + sum_k g_k · E_k(h))           E_k: Linear(d, d_h) -> GELU -> Linear(d_h, d)

The router sees the modality as well as the content, so inputs of different composition are routed
apart from the first step. Each expert's output layer starts at zero: a new MoE encoder embeds
exactly like the encoder without it, and training moves away from there.

The routing entropy regulariser (added to the contrastive loss with ``moe_entropy_weight``) is

    R(G) = mean_b H(g_b) − H(mean_b g_b)

low when each input commits to few experts (first term) while the batch as a whole uses all of
them (second term), MOON2.0's remedy against a router that collapses onto one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODALITIES = ("text", "image", "image+text")


def listing_modality(has_image, has_text) -> torch.Tensor:
    """Index into ``MODALITIES`` per listing (a listing with neither counts as text: the instruction)."""
    return torch.tensor(
        [2 if i and t else 1 if i else 0 for i, t in zip(has_image, has_text, strict=True)], dtype=torch.long
    )


def routing_entropy_loss(gates: torch.Tensor) -> torch.Tensor:
    """``mean_b H(g_b) − H(mean_b g_b)`` for gate rows ``gates`` (B, K) that sum to 1."""
    eps = 1e-9
    per_input = -(gates * (gates + eps).log()).sum(dim=-1).mean()
    mean = gates.mean(dim=0)
    return per_input + (mean * (mean + eps).log()).sum()


class ModalityMoE(torch.nn.Module):
    """Residual experts on the pooled embedding, routed by content and modality composition."""

    def __init__(self, dim: int, num_experts: int, hidden_size: int | None = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        hidden = hidden_size or dim
        self.router = torch.nn.Linear(dim + len(MODALITIES), num_experts)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))
            for _ in range(num_experts)
        )
        for expert in self.experts:  # start as the identity: the encoder's embedding unchanged
            torch.nn.init.zeros_(expert[-1].weight)
            torch.nn.init.zeros_(expert[-1].bias)

    def forward(self, h: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding before normalisation, gates)`` for pooled states ``h`` (B, d) and modality ids (B,)."""
        onehot = F.one_hot(modality.to(h.device), len(MODALITIES)).to(h.dtype)
        gates = torch.softmax(self.router(torch.cat([h, onehot], dim=-1)), dim=-1)
        mixed = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, K, d)
        return h + (gates.unsqueeze(-1) * mixed).sum(dim=1), gates
