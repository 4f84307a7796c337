"""rar.advantage_gate: the SFT-likelihood gate's weights against a loop written from its formula."""

import math

import pytest
import torch

from rar.advantage_gate import sft_likelihood_gate


def reference_weights(advantages, ref_logps, mask, group_size):
    """w_i = min(1, exp(l_i - mean of the group's l)) for A_i > 0, else 1; l = mean per-token log-likelihood."""
    out = []
    for start in range(0, len(advantages), group_size):
        rows = range(start, start + group_size)
        means = {}
        for i in rows:
            tokens = [ref_logps[i][t] for t in range(len(mask[i])) if mask[i][t]]
            if tokens:
                means[i] = sum(tokens) / len(tokens)
        group = sum(means.values()) / len(means) if means else 0.0
        for i in rows:
            gap = means[i] - group if i in means else 0.0
            out.append(min(1.0, math.exp(gap)) if advantages[i] > 0 else 1.0)
    return out


def test_weights_follow_the_formula_and_never_touch_negative_advantages():
    gen = torch.Generator().manual_seed(0)
    n, g, t = 24, 8, 7
    advantages = torch.randn(n, generator=gen)
    ref = -torch.rand(n, t, generator=gen) * 3
    mask = (torch.rand(n, t, generator=gen) > 0.3).long()
    mask[5] = 0  # an empty completion: weight 1
    weights = sft_likelihood_gate(advantages, ref, mask, g)
    expected = reference_weights(advantages.tolist(), ref.tolist(), mask.tolist(), g)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=weights.dtype))
    assert torch.all(weights[advantages <= 0] == 1) and weights[5] == 1
    positive = advantages > 0
    assert (weights[positive] < 1).any() and (weights[positive] == 1).any()  # the gate both passes and damps
    assert torch.all((weights > 0) & (weights <= 1))


def test_a_likely_sample_keeps_its_advantage_and_an_unlikely_one_loses_most():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ref = torch.tensor([[-0.1, -0.1], [-3.1, -3.1], [-5.0, -5.0], [-0.1, -0.1]])  # group mean -2.075
    weights = sft_likelihood_gate(advantages, ref, torch.ones(4, 2), 4)
    assert weights.tolist() == pytest.approx([1.0, math.exp(-3.1 + 2.075), 1.0, 1.0])


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        sft_likelihood_gate(torch.zeros(6), torch.zeros(6, 2), torch.ones(6, 2), 4)
