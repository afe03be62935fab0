"""The upstream fix the plugin carries for every V1 EAGLE user, on a plain EAGLE run (no hivis):
with chunked prefill, the drafter's KV at a chunk boundary is written from the right token, so
the drafter computes the same features whether the prompt was prefilled in one piece or in chunks
(upstream writes one wrong row per boundary; `VLLM_HIVIS_DISABLE_FIXES=
eagle_backup_token_after_partial_prefill` in a fresh process shows the difference)."""

import pytest
import torch

from hivis_testbed import assets

from .helpers import engine, model_runner, text_prompt, token_ids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def eagle_head(tmp_path_factory):
    """A random-weight EAGLE head for the tiny target, in vLLM's own EAGLE format."""
    import json

    from vllm_hivis.train.drafters import build_drafter
    from vllm_hivis.train.losses import Recipe

    text = json.load(open(f"{assets.tiny_target()}/config.json"))["text_config"]
    torch.manual_seed(0)
    d = build_drafter(Recipe.named("seq-embed", kind="eagle"), text)
    return str(d.export(tmp_path_factory.mktemp("eagle") / "head"))


def drafter_rows(llm, prompt, greedy):
    """(target position, first-pass drafter feature) of every row the drafter ran on."""
    model = model_runner(llm).drafter.model
    rows = []

    def hook(_m, _args, kwargs, out):
        pos, h = kwargs["positions"], out[0] if isinstance(out, tuple) else out
        rows.extend(zip(pos.tolist(), h.detach().clone()))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = llm.generate([{"prompt": prompt}], greedy, use_tqdm=False)
    finally:
        handle.remove()
    return out, rows


def test_plain_eagle_drafts_alike_with_and_without_chunked_prefill(eagle_head, greedy):
    question = ("Describe the image in detail. How many shapes are there? What colour is the background? "
                "Is there a red circle? Where is the blue square?")
    prompt = text_prompt(question, n_images=0)
    spec = {"method": "eagle", "model": eagle_head, "num_speculative_tokens": 2}
    runs = {}
    for mnbt in (512, 16):
        with engine(speculative_config=spec, max_num_batched_tokens=mnbt, enable_chunked_prefill=True) as llm:
            assert type(model_runner(llm).drafter).__name__ == "EagleProposer"  # stock vLLM's class
            runs[mnbt] = drafter_rows(llm, prompt, greedy)
    (out_a, rows_a), (out_b, rows_b) = runs[512], runs[16]
    assert token_ids(out_a) == token_ids(out_b)
    L = len(out_a[0].prompt_token_ids)
    assert L > 32  # at least two chunk boundaries at 16 tokens
    # the last prompt row (its input is the first sampled token) attends over every boundary row
    a = [h for p, h in rows_a if p == L - 1]
    b = [h for p, h in rows_b if p == L - 1]
    assert a and b
    torch.testing.assert_close(b[-1], a[-1], atol=1e-5, rtol=1e-5)
