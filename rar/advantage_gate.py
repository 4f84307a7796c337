"""A per-sample gate on GRPO's advantages, anchored to the SFT policy's likelihood: a variant for noisy rewards.

The fair test's second variant beyond the paper (docs/experiments/fair_test_plan.md), after the issue's description
of AdaGRPO (arXiv 2606.08480: "per-sample gating with an SFT-likelihood anchor"; the paper itself was not within
reach here, so this is our reading of that sentence, not its algorithm). A retrieval reward is noisy: among a
prompt's G samples the one that happens to lift its product may do so by an accident of the embedder, and GRPO
pushes it up all the same. The gate trusts a positive advantage in proportion to how plausible the SFT policy (the
KL reference, TRL's ``ref_per_token_logps``) finds the sample against the rest of its group::

    w_i = min(1, exp(l_i - mean_group(l)))   when A_i > 0,   w_i = 1 otherwise;   A_i <- w_i * A_i

where ``l_i`` is the sample's mean per-token log-likelihood under the reference. A sample the SFT policy finds as
likely as its group's average or more keeps its whole advantage; one it finds a nat per token less likely keeps
37% of it. Negative advantages always pass (pushing a line down never needs trusting). There is no setting to tune.

    trainer = SFTGatedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.04, ...), ...)
    # recipes/rar_grpo.py --advantage_gate sft_likelihood; logs gate/weight_positive and gate/damped_positive
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

__all__ = ["SFTGatedGRPOTrainer", "sft_likelihood_gate"]


def sft_likelihood_gate(
    advantages: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The gate's weights (one per sample, in [0, 1]) for samples in groups of ``group_size`` consecutive rows.

    ``ref_logps`` and ``completion_mask`` are (samples, tokens); an empty completion's likelihood is its group's
    mean (weight 1)."""
    n = advantages.shape[0]
    if n % group_size:
        raise ValueError(f"{n} samples do not form groups of {group_size}")
    mask = completion_mask.to(ref_logps.dtype)
    tokens = mask.sum(dim=1)
    mean_logp = (ref_logps * mask).sum(dim=1) / tokens.clamp(min=1)
    grouped = mean_logp.view(-1, group_size)
    has_tokens = (tokens > 0).view(-1, group_size).to(grouped.dtype)
    group_mean = (grouped * has_tokens).sum(dim=1, keepdim=True) / has_tokens.sum(dim=1, keepdim=True).clamp(min=1)
    gap = torch.where(has_tokens > 0, grouped - group_mean, torch.zeros_like(grouped)).view(-1)
    weights = torch.exp(gap).clamp(max=1.0)
    return torch.where(advantages > 0, weights.to(advantages.dtype), torch.ones_like(advantages))


class SFTGatedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with ``sft_likelihood_gate`` applied to each batch's advantages (module docstring).

    Needs ``beta > 0``: the reference log-likelihoods are the ones TRL computes for the KL term. The gate is computed
    over the whole generation batch (gathered across processes, since a group may straddle two), then each process
    keeps its own rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.beta == 0.0:
            raise ValueError("--advantage_gate sft_likelihood needs --beta > 0 (the SFT reference's log-likelihoods)")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        ref = output.get("ref_per_token_logps")
        if ref is None:
            return output
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        mask = output["completion_mask"]
        advantages = output["advantages"]
        # Pad to one width so the processes' rows can be gathered, then gate the whole batch's groups.
        width = torch.tensor([ref.shape[1]], device=ref.device)
        widest = int(self.accelerator.gather(width).max())
        pad = widest - ref.shape[1]
        ref_all = self.accelerator.gather(torch.nn.functional.pad(ref, (0, pad)))
        mask_all = self.accelerator.gather(torch.nn.functional.pad(mask, (0, pad)))
        adv_all = self.accelerator.gather(advantages)
        weights = sft_likelihood_gate(adv_all, ref_all, mask_all, group_size)
        rank = self.accelerator.process_index
        local = weights[rank * len(advantages) : (rank + 1) * len(advantages)]
        output["advantages"] = advantages * local
        positive = adv_all > 0
        if positive.any():
            self._metrics[mode]["gate/weight_positive"].append(weights[positive].mean().item())
            self._metrics[mode]["gate/damped_positive"].append((weights[positive] < 0.5).float().mean().item())
        return output
