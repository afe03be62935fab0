"""Prefix caching on (vLLM's default, and hivis's): outputs exact, and no request's drafter reads
drafter KV that another request wrote. Measured as a user would: requests that share a cached image
and diverge in text accept exactly as many drafts each when they run concurrently as when they run
one at a time (a tenant's private text cannot change another tenant's acceptance, or latency).

At GPU-like block sizes (32 here; CPU_ATTN needs a multiple of 32): at the CPU build's default of
128 these prompts share no block (vLLM never reuses the last cached block for EAGLE-style drafters),
and the effect would hide.
"""

import pytest

from hivis_testbed.tinyworld.dataset import sample

from .helpers import engine, hivis_spec, image_size, text_prompt, token_ids

pytestmark = pytest.mark.e2e
QUESTIONS = ["Describe the image in detail.", "How many shapes are there?", "What colour is the background?",
             "What is in the top left?", "What is in the center?", "Is there a red circle?",
             "Where is the blue square?", "What is in the bottom right?"]


def accepted(o) -> int:
    return sum(j * c for j, c in enumerate(o.outputs[0].spec_decode_metrics.histogram))


def counter(llm, name):
    return sum(m.value for m in llm.get_metrics() if m.name == name and hasattr(m, "value"))


@pytest.fixture(scope="module")
def prompts():
    image = sample("test", 4242, image_size(), kind="describe").image
    return [{"prompt": text_prompt(q), "multi_modal_data": {"image": image}} for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(prompts, greedy):
    with engine() as llm:
        return token_ids(llm.generate(prompts, greedy, use_tqdm=False))


def run(prompts, greedy, concurrent: bool):
    """(token ids, accepted drafts per request, prefix-cache hit tokens) with the image cached."""
    with engine(speculative_config=hivis_spec(k=3), enable_prefix_caching=True, block_size=32,
                per_request_spec_decode_metrics="summary") as llm:
        llm.generate(prompts[:1], greedy, use_tqdm=False)  # the image is now in the prefix cache
        hits0 = counter(llm, "vllm:prefix_cache_hits")
        if concurrent:
            outs = llm.generate(prompts, greedy, use_tqdm=False)
        else:
            outs = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
        hits = counter(llm, "vllm:prefix_cache_hits") - hits0
    return token_ids(outs), [accepted(o) for o in outs], hits


def test_shared_image_no_cross_request_influence(prompts, reference, greedy):
    alone = run(prompts, greedy, concurrent=False)
    together = run(prompts, greedy, concurrent=True)
    assert alone[0] == together[0] == reference  # exact, with the cache shared
    assert alone[2] > 0 and together[2] > 0  # the cached image blocks were really reused
    assert together[1] == alone[1], (alone[1], together[1])  # every request accepts exactly alike
    assert sum(alone[1]) > 0
