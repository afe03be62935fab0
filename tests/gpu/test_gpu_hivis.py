"""GPU-only checks (skip cleanly without CUDA): hivis on vLLM's GPU build, on both model runners,
with CUDA graphs on (vLLM's GPU default) and off, and the compiled Triton kernels.

    pytest -m gpu tests/gpu                       # on a machine with a CUDA GPU and vLLM 0.32 / 0.33

What each test catches:
- lossless on the V1 runner and on the V2 runner (VLLM_USE_V2_MODEL_RUNNER=1, the GPU default runner
  for plain EAGLE; hivis selects V1 unless a user opts in);
- acceptance with CUDA graphs equal to acceptance with enforce_eager, within a small tolerance: a
  drafter that read stale memory at graph replay (fresh tensors handed to a captured region, a
  Python step counter frozen at capture) would stay lossless but lose most of its acceptance.
Each engine runs in its own process (vLLM's default), one after another.
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

K = 4


def _run(spec, env=None, **kw):
    """(token ids, acceptance) of the e2e prompt set on a fresh engine (greedy, 64 tokens)."""
    from vllm import LLM, SamplingParams

    from hivis_testbed import assets
    from tests.e2e.helpers import prompt_set, token_ids
    from vllm_hivis.serving.acceptance import from_llm_metrics

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        llm = LLM(model=assets.tiny_target(), max_model_len=512, gpu_memory_utilization=0.3,
                  limit_mm_per_prompt={"image": 2}, disable_log_stats=False, seed=0, speculative_config=spec, **kw)
        out = token_ids(llm.generate(prompt_set(), SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False))
        acc = from_llm_metrics(llm.get_metrics()) if spec else None
        llm.llm_engine.engine_core.shutdown()
        del llm
        return out, acc
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spec():
    from hivis_testbed import assets

    return {"method": "hivis", "model": assets.tiny_drafter(), "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def reference():
    return _run(None)[0]


@pytest.mark.parametrize("runner", ["0", "1"], ids=["v1-runner", "v2-runner"])
def test_hivis_is_lossless_on_gpu(reference, runner):
    out, acc = _run(_spec(), env={"VLLM_USE_V2_MODEL_RUNNER": runner})
    assert out == reference
    assert acc.accepted_per_draft > 1.0


@pytest.mark.parametrize("runner", ["0", "1"], ids=["v1-runner", "v2-runner"])
def test_cuda_graphs_keep_acceptance(reference, runner):
    env = {"VLLM_USE_V2_MODEL_RUNNER": runner}
    eager_out, eager = _run(_spec(), env=env, enforce_eager=True)
    graph_out, graphs = _run(_spec(), env=env)  # CUDA graphs on: vLLM's default
    assert eager_out == graph_out == reference
    assert abs(graphs.accepted_per_draft - eager.accepted_per_draft) <= 0.05 * eager.accepted_per_draft, (
        f"acceptance {graphs.accepted_per_draft:.3f} with CUDA graphs vs {eager.accepted_per_draft:.3f} eager")


def test_tree_attention_kernel_on_gpu():
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
