"""In-process vLLM engines on the tiny target, shared by the e2e tests and the benchmarks.

    with engine(speculative_config={...}) as llm:
        llm.generate(prompts, sampling_params)

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, 4-8 s to start on 2 CPU cores) so that callers
can reach the model runner (`model_runner`); the environment is restored and the engine shut
down on exit, so several engines can run one after another in one process.
"""

from __future__ import annotations

import contextlib
import gc
import os

from . import assets


@contextlib.contextmanager
def engine(in_process=True, env=None, **kw):
    """A vLLM ``LLM`` on the tiny target; keyword arguments override the defaults below."""
    from vllm import LLM

    old = {k: os.environ.get(k) for k in ["VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", *(env or {})]}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB (CPU build); its default reserves 10
    os.environ.update(env or {})
    args = dict(model=assets.tiny_target(), dtype="float32", max_model_len=512, enforce_eager=True,
                gpu_memory_utilization=0.25, limit_mm_per_prompt={"image": 2}, disable_log_stats=False, seed=0)
    args.update(kw)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_runner(llm):
    """The V1 model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner
