"""afmrl.modeling and afmrl.embedded.tiny_models: tiny Qwen-VL models built in code, saved, loaded like real ones."""

import json
import shutil

import pytest
import torch
from PIL import Image

from afmrl.embedded import tiny_models
from afmrl.embedded.tiny_models import build_tiny_mllm, tiny_mllm_path
from afmrl.modeling import load_mllm, load_processor

CORPUS = [
    "red cotton t-shirt with stripes",
    "blue ceramic mug",
    "green wool scarf with checks",
    "black leather wallet with logo",
    "white porcelain plate, round",
    "yellow plastic bottle 500 ml",
    "navy denim jacket with pockets",
    "grey knitted beanie, plain",
    "pink silk tie with dots",
    "orange canvas backpack, large",
    "brown suede boots, size 42",
    "purple glass vase with floral pattern",
    "color: red; pattern: striped; material: cotton",
    "color: blue; shape: round; material: ceramic",
    "List the key attributes.",
    "key attributes color pattern material shape size logo",
] * 2
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "List the key attributes."}]}]


def image(color=(200, 30, 30), size=64):
    return Image.new("RGB", (size, size), color)


def prompt_inputs(processor, img=None):
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return processor(text=[text], images=[img or image()], return_tensors="pt")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_mllm_path(tmp_path_factory.mktemp("tiny"), "qwen2_vl", corpus=CORPUS)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_mllm("qwen2_vl", corpus=CORPUS)


def test_generates_text_for_an_image_prompt(tiny):
    model, processor = tiny
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>List the key attributes.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor(text=[text], images=[image()], return_tensors="pt")
    # 64x64 -> 56x56 = 4x4 patches of 14 -> 2x2 merged -> 4 LLM tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 4
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[1] >= 1
    decoded = processor.batch_decode(new, skip_special_tokens=True)
    assert isinstance(decoded[0], str)
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, again)  # greedy decoding is deterministic


def test_config_token_ids_match_the_tokenizer(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    assert model.config.text_config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.image_token_id == ids("<|image_pad|>") == processor.image_token_id
    assert model.config.video_token_id == ids("<|video_pad|>")
    assert model.config.vision_start_token_id == ids("<|vision_start|>")
    assert model.config.vision_end_token_id == ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == ids("<|im_end|>")
    assert model.generation_config.pad_token_id == ids("<|endoftext|>")
    # Special tokens are single tokens and never split by the BPE.
    assert tok("<|im_start|>user<|image_pad|>")["input_ids"][0] == ids("<|im_start|>")
    assert tok("<|image_pad|>")["input_ids"] == [ids("<|image_pad|>")]


def test_chat_template_string_and_block_content_and_assistant_mask(tiny):
    _, processor = tiny
    as_string = [{"role": "system", "content": "sys"}, {"role": "user", "content": "blue mug"}]
    as_blocks = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "blue mug"}]},
    ]
    rendered = processor.apply_chat_template(as_string)
    assert rendered == processor.apply_chat_template(as_blocks)
    assert rendered == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nblue mug<|im_end|>\n"
    assert processor.apply_chat_template(as_string, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    chat = as_string + [{"role": "assistant", "content": "color: blue"}]
    out = processor.tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert processor.tokenizer.decode(kept) == "color: blue<|im_end|>\n"


def test_save_reload_gives_the_same_model_and_processor(tiny, tiny_dir):
    model, processor = tiny
    reloaded, reprocessor = load_mllm(tiny_dir)
    assert type(reloaded) is type(model)
    assert hasattr(reprocessor, "image_processor")
    assert reprocessor.chat_template == processor.chat_template
    assert reprocessor.image_processor.size == processor.image_processor.size
    inputs, reinputs = prompt_inputs(processor), prompt_inputs(reprocessor)
    assert torch.equal(inputs["input_ids"], reinputs["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], reinputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**reinputs).logits)
    # The saved files name the stock processor class, so the directory is an ordinary Qwen2-VL checkpoint.
    assert json.loads((tiny_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert (tiny_dir / "model.safetensors").is_file()
    assert type(load_processor(tiny_dir)).__name__ == type(reprocessor).__name__


def test_checkpoint_in_the_hub_layout_loads_through_the_fallback(tiny, tiny_dir, tmp_path):
    """Real Qwen2-VL repos keep the image settings in preprocessor_config.json (min/max_pixels),
    the template in chat_template.json and name Qwen2Tokenizer; rewrite our save like that."""
    _, processor = tiny
    hub = tmp_path / "hub-like"
    shutil.copytree(tiny_dir, hub)
    image_config = json.loads((hub / "processor_config.json").read_text())["image_processor"]
    size = image_config.pop("size")
    image_config.update(
        min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], processor_class="Qwen2VLProcessor"
    )
    (hub / "preprocessor_config.json").write_text(json.dumps(image_config))
    (hub / "processor_config.json").unlink()
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.jinja").unlink()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tokenizer_config = json.loads((hub / "tokenizer_config.json").read_text())
    (hub / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "tokenizer_class": "Qwen2Tokenizer"}))

    loaded = load_processor(hub)
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_processor.size == processor.image_processor.size
    assert torch.equal(prompt_inputs(loaded)["input_ids"], prompt_inputs(processor)["input_ids"])


def test_tiny_mllm_path_reuses_a_complete_build_and_rebuilds_an_incomplete_one(tiny_dir, tmp_path, monkeypatch):
    weights = tiny_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    builds = []
    real_build = tiny_models.build_tiny_mllm

    def counting_build(*args, **kwargs):
        builds.append(kwargs)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tiny_models, "build_tiny_mllm", counting_build)
    assert tiny_mllm_path(tiny_dir.parent, "qwen2_vl", corpus=CORPUS) == tiny_dir
    assert builds == [] and weights.stat().st_mtime_ns == mtime

    other = tiny_mllm_path(tiny_dir.parent, "qwen2_vl", corpus=CORPUS, seed=1)
    assert other != tiny_dir and len(builds) == 1  # different settings, different directory

    path = tiny_mllm_path(tmp_path, "qwen2_vl", corpus=CORPUS)
    assert len(builds) == 2
    (path / tiny_models._MARKER).unlink()  # as if the build had been interrupted
    assert tiny_mllm_path(tmp_path, "qwen2_vl", corpus=CORPUS) == path
    assert len(builds) == 3 and (path / tiny_models._MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directories left


def test_same_seed_same_weights_different_seed_different_weights():
    first = build_tiny_mllm("qwen2_vl", corpus=CORPUS, seed=3)[0].state_dict()
    second = build_tiny_mllm("qwen2_vl", corpus=CORPUS, seed=3)[0].state_dict()
    third = build_tiny_mllm("qwen2_vl", corpus=CORPUS, seed=4)[0].state_dict()
    assert first.keys() == second.keys() == third.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert any(not torch.equal(first[name], third[name]) for name in first)


@pytest.mark.parametrize(
    ("family", "model_class", "patch_dim"),
    [
        ("qwen2_vl", "Qwen2VLForConditionalGeneration", 3 * 2 * 14 * 14),
        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 3 * 2 * 14 * 14),
        ("qwen3_vl", "Qwen3VLForConditionalGeneration", 3 * 2 * 16 * 16),  # Qwen3-VL uses patch 16
    ],
)
def test_every_family_builds_reads_pixels_and_generates(family, model_class, patch_dim):
    model, processor = build_tiny_mllm(family, corpus=CORPUS)
    assert type(model).__name__ == model_class
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    inputs = prompt_inputs(processor)
    assert inputs["pixel_values"].shape == (16, patch_dim)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 4
    with torch.no_grad():
        red = model(**inputs).logits
        blue = model(**prompt_inputs(processor, image((20, 20, 220)))).logits
    assert torch.isfinite(red).all()
    assert not torch.allclose(red[0, -1], blue[0, -1])  # the vision tower reaches the output
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # A larger image is scaled down to at most 16 LLM tokens.
    big = prompt_inputs(processor, image(size=400))
    assert (big["input_ids"] == model.config.image_token_id).sum().item() <= 16


def test_default_corpus_is_the_synthetic_catalog_vocabulary():
    synthetic_catalog = pytest.importorskip("afmrl.embedded.synthetic_catalog")
    corpus = synthetic_catalog.vocabulary_corpus()
    _, processor = build_tiny_mllm("qwen2_vl")
    trained = tiny_models.train_tokenizer(corpus)
    assert processor.tokenizer.get_vocab() == trained.get_vocab()
    word = max((w for text in corpus for w in text.split() if w.isalpha()), key=len)
    assert len(processor.tokenizer(word)["input_ids"]) < len(word.encode())  # learned merges, not bytes


def test_load_in_4bit_on_cpu_runs_eval_then_training(tiny_dir):
    try:
        import bitsandbytes as bnb
    except Exception as error:  # noqa: BLE001 - any import failure means no 4-bit here
        pytest.skip(f"bitsandbytes unavailable: {error}")
    model, processor = load_mllm(tiny_dir, load_in_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    inputs = prompt_inputs(processor)
    model.eval()
    with torch.no_grad():  # on AVX512-BF16 CPUs this used to repack the weights for inference
        assert torch.isfinite(model(**inputs).logits).all()
    model.train()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(True)  # gradients must pass the 4-bit layers
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def _raised_inside_transformers(excinfo):
    return any("transformers" in str(entry.path) for entry in excinfo.traceback)


@pytest.mark.parametrize("loader", [load_mllm, load_processor])
def test_missing_local_path_fails_early_and_names_it(loader):
    with pytest.raises(FileNotFoundError, match=r"\./no/such/model") as excinfo:
        loader("./no/such/model")
    assert not _raised_inside_transformers(excinfo)
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        loader("no/such/model")  # three parts: not a hub id either


def test_directory_without_config_fails_early_and_names_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json") as excinfo:
        load_mllm(tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    assert not _raised_inside_transformers(excinfo)


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_mllm("llava", corpus=CORPUS)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_width_depth_and_image_token_count_are_options(family):
    """A generator can be given a wider, deeper vision tower and more image tokens than the encoder it serves."""
    model, processor = build_tiny_mllm(
        family, corpus=CORPUS, vision_hidden_size=48, vision_depth=3, min_image_tokens=16
    )
    vision = model.config.vision_config
    assert (vision.embed_dim if family == "qwen2_vl" else vision.hidden_size) == 48
    assert vision.depth == len(model.model.visual.blocks) == 3
    inputs = prompt_inputs(processor)  # the same 64-px image that gives 4 tokens by default
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    with pytest.raises(ValueError, match="min_image_tokens"):
        build_tiny_mllm(family, corpus=CORPUS, min_image_tokens=32, max_image_tokens=16)
    with pytest.raises(ValueError, match="vision_depth"):
        build_tiny_mllm(family, corpus=CORPUS, vision_depth=0)
