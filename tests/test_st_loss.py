"""AGCL as a sentence-transformers loss (agcl/st_loss.py): the same loss and gradients as AGCLLoss for every filter,
weighting and direction, rows looked up by the dataset's label column; and SentenceTransformerTrainer with it
measurably improves held-out retrieval (recipes/agcl_sentence_transformers.py)."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from agcl.loss import FILTERS, AGCLLoss
from agcl.st_loss import AGCLSentenceTransformerLoss

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = ["red", "blue", "green", "black"]


class Lookup(torch.nn.Module):
    """A stand-in ST model: each feature dict carries its embeddings."""

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}


@pytest.mark.parametrize(
    ("false_negative_filter", "weighting", "symmetric"),
    list(itertools.product(FILTERS, [True, False], [False, True])),
)
def test_the_st_loss_is_agcl_on_the_rows_the_labels_name(false_negative_filter, weighting, symmetric):
    torch.manual_seed(0)
    n_rows, batch = 20, 8
    attributes = [f"color: {COLORS[i % 4]}; brand: b{i % 3}" for i in range(n_rows)]
    candidates = [f"color: {COLORS[(i + 1) % 4]}; brand: b{i % 3}" for i in range(n_rows)]
    products = [f"P{i // 2}" for i in range(n_rows)]
    rows = torch.randperm(n_rows)[:batch]  # the trainer's shuffled batch: label = row index
    q, c = torch.randn(batch, 16, requires_grad=True), torch.randn(batch, 16, requires_grad=True)
    options = {"hard_negative_weighting": weighting, "false_negative_filter": false_negative_filter,
               "symmetric": symmetric, "temperature": 0.05, "filter_threshold": 0.2}  # fmt: skip
    st_loss = AGCLSentenceTransformerLoss(Lookup(), attributes, candidates, product_ids=products, **options)
    got = st_loss([{"embedding": q}, {"embedding": c}], rows)
    picked = rows.tolist()
    q2, c2 = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    want = AGCLLoss(**options)(F.normalize(q2, dim=-1), F.normalize(c2, dim=-1),
                               query_attributes=[attributes[r] for r in picked],
                               candidate_attributes=[candidates[r] for r in picked],
                               product_ids=[products[r] for r in picked])  # fmt: skip
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(c.grad, c2.grad)


def test_the_st_loss_refuses_what_it_cannot_use():
    loss = AGCLSentenceTransformerLoss(Lookup(), ["a", "b"])
    batch = [{"embedding": torch.randn(2, 4)}, {"embedding": torch.randn(2, 4)}]
    with pytest.raises(ValueError, match="label"):
        loss(batch, None)
    with pytest.raises(ValueError, match="label 5"):
        loss(batch, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="product_ids has 1 rows"):
        AGCLSentenceTransformerLoss(Lookup(), ["a", "b"], product_ids=["P"])


def test_sentence_transformers_trainer_with_agcl_improves_retrieval(load_recipe, small_catalog_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    recipe = load_recipe("agcl_sentence_transformers")
    metrics = recipe.cli(["--catalog", str(small_catalog_dir), "--output_dir", str(tmp_path / "st"), "--batch_size",
                          "16", "--epochs", "6", "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    assert metrics["after"]["R@1"] > metrics["before"]["R@1"] + 5, metrics
    assert json.loads((tmp_path / "st" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "st" / "modules.json").is_file()  # a plain ST model on disk
