"""hivis on a Qwen2.5-VL target (M-RoPE: three-row rotary positions that advance over an image by
its grid size, not by its token count; images and videos): lossless greedy against no-spec at
batch 1 and 8 with chunked prefill (chunks ending inside images), mixed image / video /
text-only / two-image requests, a drafter prefill of exactly the text tokens, and - from the
drafter trace - a drafter that sees only text rows, at the 1-D positions of its compressed
sequence (the plan's), never the target's M-RoPE positions.

A shape-faithful tiny target built at test time from transformers' own classes (the tiny world's
tokenizer plus Qwen's vision tokens, Qwen2VLImageProcessor with 28-pixel merged patches, window
attention, mrope_section), random weights, and an untrained drafter: these tests prove exactness,
positions and prefill on M-RoPE inputs, not acceptance (no trained Qwen2.5-VL tiny-world target
exists yet)."""

import json

import numpy as np
import pytest
import torch

from hivis_testbed import assets
from hivis_testbed.tinyworld.build import CHAT_TEMPLATE
from vllm_hivis.method.checkpoint import DrafterSpec
from vllm_hivis.method.hide import as_spans, is_dropped
from vllm_hivis.serving.acceptance import from_llm_metrics
from vllm_hivis.serving.trace import load_traces
from vllm_hivis.train.drafters import HiViSDrafter

from .helpers import (
    check_lossless_under_preemption,
    check_training_pipeline_matches_serving,
    engine,
    pipeline_items,
    token_ids,
    traced_rows,
)

pytestmark = pytest.mark.e2e
VISION = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><image><|vision_end|>\n"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>\n"


@pytest.fixture(scope="module")
def qwen_target(tmp_path_factory):
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(assets.tiny_target())
    tok.add_special_tokens({"additional_special_tokens": VISION})
    start, end, video = tok.convert_tokens_to_ids(VISION)
    image = tok.convert_tokens_to_ids("<image>")  # the tiny world's image token is the image pad
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.config.architectures = [type(model).__name__]
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    target = root / "target"
    model.save_pretrained(target)
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, **pixels), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(**pixels),
                        chat_template=CHAT_TEMPLATE.replace("<image>\n", IMAGE)).save_pretrained(target)
    text = json.loads((target / "config.json").read_text())["text_config"]
    d = HiViSDrafter.for_target(text, DrafterSpec(hidden_size=64, vocab_size=len(tok), step_bias_steps=0))
    drafter = d.save_pretrained(root / "drafter", dtype=torch.float32)
    assert "mrope_section" not in json.dumps(json.loads((drafter / "config.json").read_text()))  # a 1-D drafter
    return str(target), str(drafter), {"image": image, "video": video}


def prompt(question, media=""):
    return f"<s>USER: {media}{question} ASSISTANT:"


def prompts():
    from PIL import Image

    wide, tall = Image.new("RGB", (200, 90), (200, 30, 30)), Image.new("RGB", (60, 150), (20, 160, 40))
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    meta = {"fps": 2.0, "frames_indices": list(range(4)), "total_num_frames": 4, "duration": 2.0,
            "video_backend": "opencv"}
    return [{"prompt": prompt("Describe the image in detail.", IMAGE), "multi_modal_data": {"image": wide}},
            {"prompt": prompt("How many shapes are there?", IMAGE), "multi_modal_data": {"image": tall}},
            {"prompt": prompt("What colour is the background?")},
            {"prompt": prompt("What happens in the video?", VIDEO), "multi_modal_data": {"video": (frames, meta)}},
            {"prompt": prompt("Compare the two images.", IMAGE + IMAGE), "multi_modal_data": {"image": [tall, wide]}}]


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_hivis_on_qwen2_5_vl(qwen_target, max_num_seqs, tmp_path):
    from vllm import SamplingParams

    target, drafter, pad = qwen_target
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(model=target, max_model_len=1024, limit_mm_per_prompt={"image": 2, "video": 1}, max_num_seqs=max_num_seqs)
    with engine(**kw) as llm:
        ref = llm.generate(prompts(), greedy, use_tqdm=False)
    media = [o.prompt_token_ids.count(pad["image"]) + o.prompt_token_ids.count(pad["video"]) for o in ref]
    assert media[2] == 0 and min(media[:2] + media[3:]) > 0 and len(set(media)) == 5  # sizes differ per input
    spec = {"method": "hivis", "model": drafter, "num_speculative_tokens": 3}
    with engine(speculative_config=spec, max_num_batched_tokens=32, enable_chunked_prefill=True,
                env={"VLLM_HIVIS_TRACE_DIR": str(tmp_path)}, **kw) as llm:
        before = from_llm_metrics(llm.get_metrics())
        out = llm.generate(prompts(), greedy, use_tqdm=False)
        acc = from_llm_metrics(llm.get_metrics()).minus(before)
    assert token_ids(out) == token_ids(ref)
    assert acc.drafter_prefill_tokens == sum(len(o.prompt_token_ids) for o in out) - sum(media)
    assert acc.target_prefill_tokens == sum(len(o.prompt_token_ids) for o in out)
    traces = load_traces(tmp_path)
    for o, n_media in zip(out, media):  # what the drafter ran on, per request: text rows at 1-D positions
        spans = pad_runs(o.prompt_token_ids, set(pad.values()))
        tr = traced_rows(traces, o.request_id)
        real = ~tr["is_dummy"].astype(bool)
        rows = list(zip(tr["target_pos"][real].tolist(), tr["drafter_pos"][real].tolist()))
        assert rows and not is_dropped(as_spans(spans), np.array([p for p, _ in rows], dtype=np.int64)).any()
        assert all(c == p - sum(min(max(p - (s - 1), 0), n) for s, n in spans) for p, c in rows)
        prompt_rows = {c for p, c in rows if p < len(o.prompt_token_ids)}
        assert prompt_rows == set(range(len(o.prompt_token_ids) - n_media))  # every text row, once, from 0


def pad_runs(ids, pads):
    """[(offset, length)] of the runs of placeholder tokens in a prompt."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [-1]):
        if t in pads and start is None:
            start = i
        elif t not in pads and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_qwen2_5_vl_under_preemption(qwen_target):
    """Five requests that all run to 96 tokens in a KV cache of one max_model_len: preempted,
    resumed, exact (helpers.check_lossless_under_preemption)."""
    check_lossless_under_preemption(*qwen_target[:2], prompts(), 256, limit_mm_per_prompt={"image": 2, "video": 1})



def test_training_pipeline_on_qwen2_5_vl(qwen_target, tmp_path):
    """Offline evaluator and recorded hidden states (transformers' own M-RoPE) against vLLM
    (helpers.check_training_pipeline_matches_serving)."""
    check_training_pipeline_matches_serving(*qwen_target[:2], pipeline_items(), tmp_path)
