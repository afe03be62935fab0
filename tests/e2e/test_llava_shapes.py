"""hivis at the real model's shapes: a llava-1.5-7b-hf-shaped target (hidden 4096, vocab 32064,
336 px / 576 image tokens, image token id 32000), cut to one layer per tower, random weights,
built at test time (nothing is committed or downloaded)."""

import json

import pytest
import torch

from vllm_hivis.method.checkpoint import DrafterSpec
from vllm_hivis.serving.acceptance import from_llm_metrics
from vllm_hivis.train.drafters import HiViSDrafter

from .helpers import engine, token_ids

pytestmark = pytest.mark.e2e

VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=1,
              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            num_hidden_layers=1, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=32001)


def llava_shaped_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("USER : ASSISTANT Describe the image in detail . What is this ? How many shapes are there "
             "There is one two three four a red green blue circle square triangle on background").split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in dict.fromkeys(words):
        vocab[w] = len(vocab)
    vocab |= {f"<unused{i}>": i for i in range(len(vocab), 32000)}
    vocab |= {"<image>": 32000, "<pad>": 32001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return fast


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from hivis_testbed.tinyworld.build import CHAT_TEMPLATE, save_llava

    root = tmp_path_factory.mktemp("llava-1.5-7b-shapes")
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                      image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    tok = llava_shaped_tokenizer()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                             crop_size={"height": 336, "width": 336}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    target = save_llava(model, proc, root / "target", dtype=torch.float16)
    del model
    text = json.loads((target / "config.json").read_text())["text_config"]
    d = HiViSDrafter.for_target(text, DrafterSpec(hidden_size=4096, vocab_size=32064, step_bias_steps=2))
    drafter = d.save_pretrained(root / "drafter", dtype=torch.float16)
    return str(target), str(drafter)


def test_hivis_at_llava_1_5_7b_shapes(shapes):
    from PIL import Image
    from vllm import SamplingParams

    target, drafter = shapes
    image = Image.new("RGB", (500, 400), (200, 30, 30))
    prompts = [{"prompt": "<s>USER: <image>\nDescribe the image in detail . ASSISTANT:",
                "multi_modal_data": {"image": image}},
               {"prompt": "<s>USER: How many shapes are there ? ASSISTANT:"}]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(model=target, max_model_len=1024, limit_mm_per_prompt={"image": 1})
    with engine(**kw) as llm:
        ref = llm.generate(prompts, greedy, use_tqdm=False)
    assert ref[0].prompt_token_ids.count(32000) == 576
    spec = {"method": "hivis", "model": drafter, "num_speculative_tokens": 3}
    with engine(speculative_config=spec, max_num_batched_tokens=256, **kw) as llm:
        before = from_llm_metrics(llm.get_metrics())  # the prefill counters are per process: deltas
        out = llm.generate(prompts, greedy, use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics()).minus(before)
    assert token_ids(out) == token_ids(ref)
    text_tokens = sum(len(o.prompt_token_ids) - o.prompt_token_ids.count(32000) for o in out)
    assert acc.drafter_prefill_tokens == text_tokens  # 576 image tokens hidden, chunked at 256
    assert acc.target_prefill_tokens == sum(len(o.prompt_token_ids) for o in out)
    assert acc.num_drafts > 0
