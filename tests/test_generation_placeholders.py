"""A multimodal policy never writes its image or video placeholder: TRL's GRPO masks the image one while it samples,
so its probability can grow unpenalised, and unmasked greedy decoding would then emit runs of it (invisible once
special tokens are skipped: a line cut short). Generation here masks both, and GRPO's forward pass does too, so the
loss scores the distribution that is sampled."""

import torch

from afmrl.catalog import load_catalog
from rar.annotate import generate_attributes, load_generator
from rar.policy import mask_placeholder_logits, placeholder_token_ids
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


def test_the_masked_forward_pass_gives_placeholders_no_mass_and_still_trains(tiny_model_dir, small_catalog_dir):
    model, processor = load_generator(tiny_model_dir)
    image, video = model.config.image_token_id, model.config.video_token_id
    model.get_output_embeddings().register_forward_hook(lambda m, i, logits: logits + 100.0 * (
        torch.arange(logits.shape[-1]) == image))  # fmt: skip
    handle = mask_placeholder_logits(model)
    tokenizer = processor.tokenizer
    batch = tokenizer(["color: red; logo: star"], return_tensors="pt")
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    probs = out.logits.softmax(-1)
    assert float(probs[..., [image, video]].max()) == 0.0  # no mass on either placeholder, favoured or not
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits.log_softmax(-1)).all()
    out.loss.backward()
    assert model.get_output_embeddings().weight.grad[image].abs().sum() == 0  # no gradient reaches a masked row
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    handle.remove()
    assert float(model(**batch).logits.softmax(-1)[..., image].min()) > 0.99  # the drift the mask hides
