"""MOON's guided mixture of experts in the language model's feed-forward layers (MOON, arXiv 2508.11999).

A listing's tokens are of different kinds: photo tokens, the words of its category, the words of its other
attributes, and the rest (instruction, title, template). MOON gives the product's modalities and aspects their
own feed-forward experts, chosen by what a token is rather than by a learned router ("guided"): here each of
``guided_moe_layers`` decoder layers keeps its own MLP for every token (the shared expert, with its pretrained
weights and any LoRA) and adds one expert per kind of token,

    y_t = MLP(x_t) + E_{kind(t)}(x_t)       kind(t) in {image, category, attribute}; other tokens: MLP(x_t) only
    E_k(x) = W2_k GELU(W1_k x),  W2_k = 0 at start

so a new guided encoder embeds exactly like the encoder without it, and training moves away from there. The layers
are the N before the last: the embedding is the last layer's state at the closing token, so the last layer's MLP
acts on the embedding only there (a token of kind other) and experts in it would never learn. The kind
of each token comes from the listing as the package writes it: ``<|image_pad|>`` tokens are image; on the
attribute line (``attribute_prefix`` + ``key: value; key: value``) the ``category`` pair is category and the rest
attribute. The experts sit beside the backbone (forward hooks on the chosen layers' MLPs), so the backbone's
weights and checkpoint format are unchanged; they are saved as ``guided_moe.safetensors``.

    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone="pretrained-tiny-qwen2-vl", guided_moe_layers=2))
"""

from __future__ import annotations

import torch

__all__ = ["GUIDED_MOE_FILE", "TOKEN_KINDS", "GuidedExperts", "language_layers", "token_kinds"]

GUIDED_MOE_FILE = "guided_moe.safetensors"
TOKEN_KINDS = ("other", "image", "category", "attribute")


def language_layers(backbone) -> torch.nn.ModuleList:
    """The language model's decoder layers (the first ``layers`` ModuleList outside the vision tower)."""
    for name, module in backbone.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and "visual" not in name:
            return module
    raise ValueError("no language-model decoder layers found in the backbone")


def _spans(text: str, prefix: str, category_key: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Character spans (attribute line, its category pair) in one rendered listing; (-1, -1) when absent."""
    end = text.rfind("<|im_end|>")
    end = len(text) if end < 0 else end
    start = text.rfind("\n" + prefix, 0, end)
    if start < 0:
        return (-1, -1), (-1, -1)
    line = (start + 1, end)
    position = start + 1 + len(prefix)
    for part in text[position:end].split(";"):
        if part.strip().lower().startswith(category_key + ":"):
            return line, (position, position + len(part))
        position += len(part) + 1
    return line, (-1, -1)


def token_kinds(tokenizer, expanded_texts, input_ids, prefix: str, category_key: str = "category") -> torch.Tensor:
    """(B, L) indices into ``TOKEN_KINDS`` for a batch whose image tokens are already expanded in ``expanded_texts``
    (as the processor tokenised them into ``input_ids``; right padding counts as other)."""
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    encoded = tokenizer(list(expanded_texts), add_special_tokens=False, return_offsets_mapping=True)
    kinds = torch.zeros_like(input_ids)
    for row, (ids, offsets, text) in enumerate(
        zip(encoded["input_ids"], encoded["offset_mapping"], expanded_texts, strict=True)
    ):
        if ids != input_ids[row, : len(ids)].tolist():
            raise ValueError("guided experts: the listing's tokens could not be located in the batch (tokenizer?)")
        (line_start, line_end), (cat_start, cat_end) = _spans(text, prefix, category_key)
        for i, (token, (s, e)) in enumerate(zip(ids, offsets, strict=True)):
            if token == image_id:
                kinds[row, i] = 1
            elif cat_start <= s < cat_end or (s < cat_start < e):
                kinds[row, i] = 2
            elif line_start <= s < line_end:
                kinds[row, i] = 3
    return kinds


class GuidedExperts(torch.nn.Module):
    """One expert per guided token kind in each of the last ``num_layers`` decoder layers (see the module doc)."""

    def __init__(self, num_layers: int, hidden_size: int, expert_size: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"guided_moe_layers must be >= 1, got {num_layers}")
        kinds = len(TOKEN_KINDS) - 1
        self.experts = torch.nn.ModuleList(
            torch.nn.ModuleList(
                torch.nn.Sequential(
                    torch.nn.Linear(hidden_size, expert_size),
                    torch.nn.GELU(),
                    torch.nn.Linear(expert_size, hidden_size),
                )
                for _ in range(kinds)
            )
            for _ in range(num_layers)
        )
        for layer in self.experts:
            for expert in layer:
                torch.nn.init.zeros_(expert[-1].weight)
                torch.nn.init.zeros_(expert[-1].bias)
        self.kinds: torch.Tensor | None = None  # (B, L) of the forward in progress, set by the encoder
        self._handles = []

    def attach(self, backbone) -> None:
        """Add the experts to the last layers' MLP outputs (forward hooks: recomputation under activation
        checkpointing runs them again)."""
        layers = list(language_layers(backbone))
        n = len(self.experts)
        if n > len(layers) - 1:
            raise ValueError(
                f"guided_moe_layers={n} but the language model has {len(layers)} layers (at most "
                f"{len(layers) - 1}: the last layer's MLP reaches the embedding only at the pooled token)"
            )
        for experts, layer in zip(self.experts, layers[-n - 1 : -1], strict=True):
            self._handles.append(layer.mlp.register_forward_hook(self._hook(experts)))

    def _hook(self, experts):
        def add_experts(module, args, output):
            kinds = self.kinds
            if kinds is None or kinds.shape != output.shape[:2]:
                raise ValueError("guided experts: this forward has no token kinds (build inputs with the encoder)")
            x = args[0]
            extra = torch.zeros_like(output)
            for k, expert in enumerate(experts, start=1):
                mask = kinds == k
                if mask.any():
                    extra[mask] = expert(x[mask].to(expert[0].weight.dtype)).to(output.dtype)
            return output + extra

        return add_experts
