"""hivis with more than one worker: tensor parallel 2 over vLLM's multiprocessing executor (the
largest layout the CPU build supports: it refuses the Ray executor, "current platform cpu does not
support ray"). Outputs equal a single worker's, and the drafter/target prefill counters are
counted once (every rank sees the same rows; only the first one counts). (The plugin in Ray worker
processes: tests/e2e/test_pipeline.py runs vLLM engines inside Ray Data actors.)"""

import json

import pytest

from hivis_testbed import assets
from vllm_hivis.serving.acceptance import from_llm_metrics

from .helpers import engine, hivis_spec, prompt_set, token_ids

pytestmark = pytest.mark.e2e
# vLLM's CPU workers bind their OpenMP threads one NUMA node each; this machine has one node:
# one core per rank instead.
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def run(tp: int, spec=None):
    from vllm import SamplingParams

    prompts = prompt_set()[:6]
    with engine(in_process=False, env=TP2 if tp > 1 else None, speculative_config=spec, tensor_parallel_size=tp,
                distributed_executor_backend="mp") as llm:
        out = token_ids(llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False))
        acc = from_llm_metrics(llm.get_metrics())
    return out, acc


def test_tensor_parallel_2_equals_one_worker_and_counts_once():
    single, _ = run(1, hivis_spec(k=3))
    tp2, acc = run(2, hivis_spec(k=3))
    assert tp2 == single
    cfg = json.load(open(f"{assets.tiny_target()}/config.json"))
    text_tokens = 6 * (157 - cfg["image_seq_length"])  # six describe prompts: 13 text tokens each
    assert acc.drafter_prefill_tokens == text_tokens and acc.target_prefill_tokens == 6 * 157
    assert acc.num_accepted > 0


def test_the_ray_executor_is_vllms_to_refuse_on_the_cpu():
    """The CPU build refuses Ray workers itself; hivis neither hides nor changes that error."""
    import ray

    try:
        with pytest.raises(Exception, match="does not support ray"):  # in-process: the error itself
            with engine(speculative_config=hivis_spec(k=3), distributed_executor_backend="ray"):
                pass
    finally:  # vLLM started a Ray cluster in this process before refusing: later tests start their own
        if ray.is_initialized():
            ray.shutdown()


def test_a_multi_layer_drafter_under_tensor_parallel_2(tmp_path):
    """The target's intermediate layers (vLLM's auxiliary hidden states) reach the drafter the same
    on every rank: a multi-layer drafter drafts and accepts exactly as with one worker."""
    from .test_parity import multi_layer_drafter

    spec = hivis_spec(k=3, drafter=multi_layer_drafter(tmp_path / "ml"))
    (single, acc1), (tp2, acc2) = run(1, spec), run(2, spec)
    assert tp2 == single and acc1.num_drafts > 0
    assert (acc2.num_drafts, acc2.num_accepted, acc2.per_position_counts) == \
        (acc1.num_drafts, acc1.num_accepted, acc1.per_position_counts)
