"""A multimodal policy never writes its image or video placeholder: TRL's GRPO masks the image one while it samples,
so its probability can grow unpenalised, and unmasked greedy decoding would then emit runs of it (invisible once
special tokens are skipped: a line cut short). Generation here masks both, as the policy was trained."""

import torch

from afmrl.catalog import load_catalog
from rar.annotate import generate_attributes, load_generator, placeholder_token_ids
from rar.prompts import build_prompt_dataset


def test_a_policy_that_ranks_the_image_placeholder_first_still_writes_words(
    tiny_model_dir, small_catalog_dir, monkeypatch
):
    model, processor = load_generator(tiny_model_dir)
    image, video = model.config.image_token_id, model.config.video_token_id
    assert sorted(placeholder_token_ids(model)) == sorted([image, video])

    def favour_image_token(module, inputs, logits):  # a policy whose mass drifted onto the masked token
        logits = logits.clone()
        logits[..., image] += 100.0
        return logits

    model.get_output_embeddings().register_forward_hook(favour_image_token)
    prompts = build_prompt_dataset(load_catalog(small_catalog_dir).select(range(3)))
    torch.manual_seed(0)
    masked = generate_attributes(model, processor, prompts, max_new_tokens=6, show_progress=False)
    assert all(masked), masked  # words, the placeholder never among them
    monkeypatch.setattr("rar.annotate.placeholder_token_ids", lambda model: [])
    unmasked = generate_attributes(model, processor, prompts, max_new_tokens=6, show_progress=False)
    assert unmasked == ["", "", ""]  # the premise: unmasked, only placeholders, which decoding drops
