"""Lossless greedy decoding under every engine configuration that changes the drafter's windows:
batch 1, chunked prefill with chunks ending inside images, forced preemption (tiny KV cache, ignore_eos), the
unpadded drafter batch. Engines run in-process, one at a time."""

import json

import pytest

from hivis_testbed import assets
from vllm_hivis.serving.acceptance import from_llm_metrics

from .helpers import engine, hivis_spec, prompt_set, token_ids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(greedy):
    with engine() as llm:
        return token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False))


@pytest.mark.parametrize("config", [
    dict(max_num_seqs=1),  # batch 1
    dict(max_num_batched_tokens=16, enable_chunked_prefill=True),  # chunks end inside images
    dict(max_num_batched_tokens=40, enable_chunked_prefill=True,
         spec=dict(k=5, disable_padded_drafter_batch=True)),
])
def test_lossless_configs(reference, greedy, config):
    config = dict(config)  # parametrize objects are shared between runs
    spec = hivis_spec(**config.pop("spec", dict(k=4)))  # resolved at run time: collection needs no assets
    with engine(speculative_config=spec, **config) as llm:
        before = from_llm_metrics(llm.get_metrics())  # hivis prefill counters are per process
        out = token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False))
        acc = from_llm_metrics(llm.get_metrics()).minus(before)
    assert out == reference
    assert acc.num_accepted > 0


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_lossless_under_preemption(prefix_caching):
    """A KV cache of 17 blocks x 32 tokens (one max_model_len) for 8 concurrent requests that all
    run to their token limit (ignore_eos): running requests must be preempted and resumed, from
    the prefix cache (vLLM's default) or recomputed from scratch."""
    from vllm import SamplingParams

    prompts = prompt_set()
    sp = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    with engine() as llm:
        reference = token_ids(llm.generate(prompts, sp, use_tqdm=False))
    with engine(speculative_config=hivis_spec(k=4), block_size=32, num_gpu_blocks_override=17,
                max_num_seqs=8, enable_prefix_caching=prefix_caching) as llm:
        before = from_llm_metrics(llm.get_metrics())
        out = token_ids(llm.generate(prompts, sp, use_tqdm=False))
        acc = from_llm_metrics(llm.get_metrics()).minus(before)
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert out == reference
    assert acc.num_accepted > 0
    assert preemptions > 0
    if not prefix_caching:  # recomputation: the target prefilled more than the prompts hold
        assert acc.target_prefill_tokens > sum(len_prompt_tokens(p) for p in prompts)


def len_prompt_tokens(p):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.tiny_target())
    n_img = json.load(open(f"{assets.tiny_target()}/config.json"))["image_seq_length"]
    imgs = p.get("multi_modal_data", {}).get("image", [])
    n = len(imgs) if isinstance(imgs, list) else 1
    n = n if "multi_modal_data" in p else 0
    return len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) + n * (n_img - 1)


