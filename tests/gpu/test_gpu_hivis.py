"""GPU-only checks (skip cleanly without CUDA): hivis on vLLM's GPU build, and the compiled Triton
kernels. Run on a GPU machine with `pytest -m gpu` (kernels: TRITON_INTERPRET=0 pytest tests/kernels)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_hivis_is_lossless_on_gpu():
    from vllm import LLM, SamplingParams

    from hivis_testbed import assets
    from tests.e2e.helpers import prompt_set, token_ids
    from vllm_hivis.serving.acceptance import from_llm_metrics

    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    kw = dict(model=assets.tiny_target(), max_model_len=512, gpu_memory_utilization=0.3,
              limit_mm_per_prompt={"image": 2}, disable_log_stats=False)
    ref = LLM(**kw)
    want = token_ids(ref.generate(prompt_set(), greedy, use_tqdm=False))
    del ref
    llm = LLM(**kw, speculative_config={"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": 4})
    assert token_ids(llm.generate(prompt_set(), greedy, use_tqdm=False)) == want
    assert from_llm_metrics(llm.get_metrics()).accepted_per_draft > 1.0


def test_tree_attention_kernel_on_gpu():
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on; run with TRITON_INTERPRET=0 to compile for the GPU")
    from vllm_hivis.kernels.tree_attention import tree_attention, tree_attention_ref

    torch.manual_seed(0)
    dev, H, KVH, D, B, bs = "cuda", 8, 2, 64, 3, 16
    seq = torch.tensor([40, 17, 64], dtype=torch.int32, device=dev)
    q_lens = torch.tensor([5, 1, 8], dtype=torch.int32, device=dev)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32, device=dev), q_lens.cumsum(0).int()])
    nb = 16
    k = torch.randn(nb, bs, KVH, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32)[: B * 4].view(B, 4).contiguous()
    q = torch.randn(int(qsl[-1]), H, D, device=dev, dtype=torch.bfloat16)
    out = tree_attention(q, k, v, bt, seq, qsl, None, None, D ** -0.5, use_tree_mask=False)
    ref = tree_attention_ref(q, k, v, bt, seq, qsl, None, None, D ** -0.5, use_tree_mask=False)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
