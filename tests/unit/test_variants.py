"""The conversions that warm-start the LLaVA-NeXT and Qwen2.5-VL tiny-world targets from the
shipped LLaVA-1.5 target (hivis_testbed.tinyworld.variants), before any fine-tuning."""

import json

import pytest
import torch

from hivis_testbed import assets
from hivis_testbed.tinyworld import variants
from hivis_testbed.tinyworld.dataset import sample
from vllm_hivis.train.prompts import chat_text

TEXT = "<s>USER: How many shapes are there? ASSISTANT: There are"


@pytest.fixture(scope="module")
def scene():
    return sample("test", 0, variants.SCENE_SIZE, kind="describe")


def text_logits(model, tok, n_vocab):
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, :, :n_vocab]


def test_next_keeps_llava_weights_and_tiles_the_scene(scene):
    llava, tok = variants._llava(assets.tiny_target())
    model, proc = variants.convert_next(assets.tiny_target())
    torch.testing.assert_close(text_logits(model, tok, tok.vocab_size), text_logits(llava, tok, tok.vocab_size))
    enc = proc(images=[scene.image], text=[chat_text(proc, scene.qa.question)], return_tensors="pt",
               add_special_tokens=False)
    # base view 12x12 patches + four 2x tiles (24x24) with one newline per tile row
    assert (enc["input_ids"] == model.config.image_token_index).sum() == 144 + 24 * 25
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape[1] == enc["input_ids"].shape[1] and torch.isfinite(out.logits).all()


def test_qwen_copies_the_language_model_and_matches_llava_patches(scene):
    model, proc, llava = variants.convert_qwen(assets.tiny_target())  # asserts equal text-only logits itself
    tok = proc.tokenizer
    n_old = llava.config.text_config.vocab_size
    assert len(tok) == n_old + len(variants.VISION_TOKENS)
    torch.testing.assert_close(text_logits(model, tok, n_old), text_logits(llava, tok, n_old), atol=1e-4, rtol=0)
    enc = proc(images=[scene.image], text=[chat_text(proc, scene.qa.question)], return_tensors="pt",
               add_special_tokens=False)
    # 168 px upscaled to 336 (min_pixels): 12 x 12 merged tokens, one per LLaVA patch
    assert enc["image_grid_thw"].tolist() == [[1, 24, 24]]
    assert (enc["input_ids"] == model.config.image_token_id).sum() == 144
    loss = variants.distill_loss(model, proc, llava)([scene, sample("test", 1, variants.SCENE_SIZE)])
    assert torch.isfinite(loss) and loss.item() > 0.1  # untrained vision tower: far from the teacher


def test_image_size_of_an_any_size_target_comes_from_its_provenance(tmp_path):
    from vllm_hivis.train.target import ANY_SIZE, image_size

    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"depth": 2}, "text_config": {}}))
    assert image_size(tmp_path) == ANY_SIZE
    (tmp_path / "provenance.json").write_text(json.dumps({"image_size": 168}))
    assert image_size(tmp_path) == 168
    assert image_size(assets.tiny_target()) == 168  # LLaVA: the tower's own input size
