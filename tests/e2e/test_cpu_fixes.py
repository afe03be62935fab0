"""Fixes of the CPU build, each shown on the failure a user meets (fresh processes: the bug is
in what a process has imported before its engine starts)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

AFTER_NUMBA = """
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import numba  # what vLLM's own ngram proposer imports
from vllm import LLM, SamplingParams
from hivis_testbed import assets
llm = LLM(model=assets.tiny_target(), dtype="float32", max_model_len=256, enforce_eager=True,
          gpu_memory_utilization=0.25)
out = llm.generate(["<s>USER: How many shapes are there? ASSISTANT:"], SamplingParams(max_tokens=4))
print("GENERATED", len(out[0].outputs[0].token_ids))
"""


def run(code, **env):
    e = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=600)


def test_an_engine_starts_in_a_process_that_imported_numba():
    r = run(AFTER_NUMBA)
    assert "GENERATED 4" in r.stdout, r.stderr[-3000:]
    stock = run(AFTER_NUMBA, VLLM_HIVIS_DISABLE_FIXES="cpu_engines_start_with_numba_imported")
    assert "GENERATED" not in stock.stdout and "'_lib_fn_wrapper' object has no attribute 'get'" in stock.stderr
