"""hivis on the trained tiny-world targets of the other families, with their shipped drafters:
LLaVA-NeXT (any-resolution: 744 image tokens per scene) and Qwen2.5-VL (M-RoPE). Per target:
lossless greedy against no-spec at batch 8 on the mixed prompt set, acceptance on held-out
scenes, and T=1 sampling that follows the target's exact distribution.

The random-weight, shape-faithful targets in test_llava_next.py / test_qwen2_5_vl.py prove
exactness under chunked prefill and preemption, positions and prefill; these trained targets
make drafts that are mostly right, so acceptance is measurable and the sampler's accept and
recover branches both run on a real distribution. One reference and one hivis engine per target,
out of process (test_hivis_engine.py says why).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from hivis_testbed import assets
from hivis_testbed.tinyworld.dataset import sample
from vllm_hivis.serving.acceptance import from_llm_metrics
from vllm_hivis.train.prompts import chat_text
from vllm_hivis.train.target import image_size, image_token_id

from .helpers import check_matches_distribution, engine, exact_prefix_probs, token_ids

pytestmark = pytest.mark.e2e
SEEDS = np.random.default_rng(2024).integers(0, 2**31, 1500).tolist()  # see test_hivis_engine.py


class Variant:
    def __init__(self, kind):
        from transformers import AutoProcessor

        self.kind = kind
        self.target, self.drafter = assets.variant(kind)
        self.processor = AutoProcessor.from_pretrained(self.target, local_files_only=True)
        self.size = image_size(self.target)
        self.image_id = image_token_id(json.loads((Path(self.target) / "config.json").read_text()))

    def prompt(self, question, images=()):
        """A vLLM prompt through the target's own chat template (one placeholder per image)."""
        text = chat_text(self.processor, question, len(images))
        return {"prompt": text, **({"multi_modal_data": {"image": list(images)}} if images else {})}

    def prompt_set(self):
        """Long descriptions, every QA kind, a text-only and a two-image prompt."""
        out = [self.prompt(s.qa.question, [s.image]) for s in (sample("test", i, self.size, kind="describe")
                                                              for i in range(4))]
        for j, kind in enumerate(("count", "colour", "where", "cell", "yesno")):
            s = sample("test", 100 + j, self.size, kind=kind)
            out.append(self.prompt(s.qa.question, [s.image]))
        out.append(self.prompt("How many shapes are there?"))
        a, b = sample("test", 200, self.size), sample("test", 201, self.size)
        out.append(self.prompt("Describe the image in detail.", [a.image, b.image]))
        return out


@pytest.fixture(scope="module", params=sorted(assets.VARIANTS))
def variant(request):
    """(Variant, no-spec engine, hivis engine, no-spec greedy outputs of the prompt set)."""
    from vllm import SamplingParams

    v = Variant(request.param)
    kw = dict(model=v.target, max_model_len=2048, in_process=False, max_num_seqs=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=160)
    with engine(**kw) as ref:
        out = ref.generate(v.prompt_set(), greedy, use_tqdm=False)
        spec = {"method": "hivis", "model": v.drafter, "num_speculative_tokens": 3}
        with engine(speculative_config=spec, **kw) as hivis:
            yield v, ref, hivis, out


def test_lossless_batch8(variant):
    from vllm import SamplingParams

    v, _, hivis, ref = variant
    n_img = [o.prompt_token_ids.count(v.image_id) for o in ref]
    # LLaVA-NeXT: base view + tiles (744 per scene); Qwen2.5-VL: one merged token per 28-px patch
    assert n_img[0] == {"next": 744, "qwen": 144}[v.kind] and n_img[-2] == 0 and n_img[-1] == 2 * n_img[0]
    before = from_llm_metrics(hivis.get_metrics())
    out = hivis.generate(v.prompt_set(), SamplingParams(temperature=0.0, max_tokens=160), use_tqdm=False)
    acc = from_llm_metrics(hivis.get_metrics()).minus(before)
    assert token_ids(out) == token_ids(ref)
    assert 0 < acc.num_accepted < acc.num_draft_tokens
    cached = sum(o.num_cached_tokens or 0 for o in out)
    assert acc.target_prefill_tokens == sum(len(o.prompt_token_ids) for o in out) - cached
    if cached == 0:  # (nothing cached: the drafter prefilled exactly the text tokens)
        assert acc.drafter_prefill_tokens == sum(len(o.prompt_token_ids) for o in out) - sum(n_img)


def test_acceptance_on_held_out_scenes(variant):
    from vllm import SamplingParams

    v, _, hivis, _ = variant
    prompts = [v.prompt(s.qa.question, [s.image]) for s in (sample("test", 1000 + i, v.size, kind="describe")
                                                            for i in range(12))]
    before = from_llm_metrics(hivis.get_metrics())
    hivis.generate(prompts, SamplingParams(temperature=0.0, max_tokens=160), use_tqdm=False)
    acc = from_llm_metrics(hivis.get_metrics()).minus(before)
    print(f"\n{v.kind} held-out acceptance (k=3): {acc.accepted_per_draft:.2f} accepted drafts/step, "
          f"{acc.tokens_per_step:.2f} tokens/step (incl. bonus), per position {acc.per_position}")
    assert acc.accepted_per_draft > 2.0  # of 3 drafts: a drafter that learned this target's hidden states


def test_sampling_distribution_matches_target(variant):
    """T=1: the first 4 generated tokens follow the target's exact distribution (teacher forcing
    in transformers) with and without hivis; the prompt leaves the target uncertain (a colour
    question about a noise image), so drafts are both accepted and rejected."""
    from PIL import Image
    from vllm import SamplingParams

    v, ref, hivis, _ = variant
    n = len(SEEDS)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (v.size, v.size, 3), dtype=np.uint8))
    p = v.prompt(sample("test", 103, v.size, kind="colour").qa.question, [noise])
    runs = {}
    before = from_llm_metrics(hivis.get_metrics())
    for name, llm in (("no-spec", ref), ("hivis", hivis)):
        sp = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in SEEDS]
        runs[name] = [tuple(o.outputs[0].token_ids) for o in llm.generate([p] * n, sp, use_tqdm=False)]
    acc = from_llm_metrics(hivis.get_metrics()).minus(before)
    assert 0 < acc.num_accepted < acc.num_draft_tokens, "drafts must be both accepted and rejected"
    probs = exact_prefix_probs(v.target, p, {s for r in runs.values() for s in r if v.image_id not in s})
    check_matches_distribution(runs, probs, n, label=f"{v.kind} ")
