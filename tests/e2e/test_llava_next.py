"""hivis on a LLaVA-NeXT target (any-resolution tiling: the image-token count varies with each
image's size and aspect ratio, image_newline tokens included): lossless greedy against no-spec at
batch 1 and 8, chunked prefill with chunks inside images, mixed image / text-only / two-image
requests, and a drafter prefill of exactly the text tokens. A shape-faithful tiny target (the
tiny world's tokenizer, chat template and CLIP-style vision tower; LLaVA-NeXT's projector, grid
pinpoints and image_newline), random weights, built at test time, and an untrained drafter:
these tests prove exactness and the drafter's text-only prefill on any-resolution inputs, not
acceptance (no trained LLaVA-NeXT tiny-world target exists yet)."""

import json

import pytest
import torch

from hivis_testbed import assets
from vllm_hivis.method.checkpoint import DrafterSpec
from vllm_hivis.serving.acceptance import from_llm_metrics
from vllm_hivis.train.drafters import HiViSDrafter

from .helpers import (
    check_lossless_under_preemption,
    check_training_pipeline_matches_serving,
    engine,
    pipeline_items,
    text_prompt,
    token_ids,
)

pytestmark = pytest.mark.e2e
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


@pytest.fixture(scope="module")
def next_target(tmp_path_factory):
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from hivis_testbed.tinyworld.build import CHAT_TEMPLATE, save_llava

    tiny = json.load(open(f"{assets.tiny_target()}/config.json"))
    tok = AutoTokenizer.from_pretrained(assets.tiny_target())
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=tiny["text_config"]["vocab_size"], max_position_embeddings=2048,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tiny["image_token_index"],
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessor(size={"shortest_edge": 56},
                                                                      crop_size={"height": 56, "width": 56},
                                                                      image_grid_pinpoints=PINPOINTS),
                              tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    root = tmp_path_factory.mktemp("llava-next")
    target = save_llava(model, proc, root / "target", dtype=torch.float32)
    d = HiViSDrafter.for_target(json.loads((target / "config.json").read_text())["text_config"],
                                DrafterSpec(hidden_size=64, vocab_size=text.vocab_size, step_bias_steps=0))
    return str(target), str(d.save_pretrained(root / "drafter", dtype=torch.float32)), cfg.image_token_index


def prompts():
    from PIL import Image

    wide, tall = Image.new("RGB", (200, 90), (200, 30, 30)), Image.new("RGB", (60, 150), (20, 160, 40))
    square = Image.new("RGB", (120, 120), (30, 30, 200))
    return [{"prompt": text_prompt("Describe the image in detail."), "multi_modal_data": {"image": wide}},
            {"prompt": text_prompt("How many shapes are there?"), "multi_modal_data": {"image": tall}},
            {"prompt": text_prompt("What colour is the background?", n_images=0)},
            {"prompt": text_prompt("Describe the image in detail.", n_images=2),
             "multi_modal_data": {"image": [square, wide]}},
            {"prompt": text_prompt("Where is the blue square?"), "multi_modal_data": {"image": square}}]


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_hivis_on_llava_next(next_target, max_num_seqs):
    from vllm import SamplingParams

    target, drafter, image_id = next_target
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(model=target, max_model_len=2048, limit_mm_per_prompt={"image": 2}, max_num_seqs=max_num_seqs)
    with engine(**kw) as llm:
        ref = llm.generate(prompts(), greedy, use_tqdm=False)
    counts = [o.prompt_token_ids.count(image_id) for o in ref]
    assert counts[2] == 0 and len({counts[0], counts[1], counts[4]}) == 3  # any-res: counts differ per image
    spec = {"method": "hivis", "model": drafter, "num_speculative_tokens": 3}
    with engine(speculative_config=spec, max_num_batched_tokens=64, enable_chunked_prefill=True, **kw) as llm:
        before = from_llm_metrics(llm.get_metrics())
        out = llm.generate(prompts(), greedy, use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics()).minus(before)
    assert token_ids(out) == token_ids(ref)
    text_tokens = sum(len(o.prompt_token_ids) - o.prompt_token_ids.count(image_id) for o in out)
    assert acc.drafter_prefill_tokens == text_tokens
    assert acc.target_prefill_tokens == sum(len(o.prompt_token_ids) for o in out)


def test_llava_next_under_preemption(next_target):
    """Five requests that all run to 96 tokens in a KV cache of one max_model_len: preempted,
    resumed, exact (helpers.check_lossless_under_preemption)."""
    check_lossless_under_preemption(*next_target[:2], prompts(), 512, limit_mm_per_prompt={"image": 2})


def test_training_pipeline_on_llava_next(next_target, tmp_path):
    """Offline evaluator and recorded hidden states (any-resolution image inputs) against vLLM
    (helpers.check_training_pipeline_matches_serving)."""
    check_training_pipeline_matches_serving(*next_target[:2], pipeline_items(), tmp_path,
                                            limit_mm_per_prompt={"image": 2})
