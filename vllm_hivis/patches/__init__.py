"""Every change vllm-hivis makes to vLLM's behaviour, by reason:

    hivis.py      the wiring of the hivis method (inert for runs without a hivis config)
    upstream.py   fixes of vLLM bugs that every user of the plugin meets (each says whom)
    vllm_cpu.py   fixes of bugs of the CPU build
    helper.py     the one mechanism: named replacement, double-patch refusal, signature check,
                  original kept, logged; post-import hooks
    registry.py   the list the patch functions register themselves in, with their targets
    version.py    the supported vLLM releases

`apply_all()` (called by the plugin entry point in every vLLM process: API server, engine core,
workers) schedules each patch to run right after its vLLM module is imported, once per process.

Version policy: vLLM releases in ``SUPPORTED_VLLM`` get every patch. On any other release the
plugin stays inert (one warning) and a hivis config fails at startup with a message saying which
releases are supported; runs without hivis behave exactly as stock vLLM. A patch whose target's
signature differs from the one it was written for is skipped with a warning (never a crash in
vLLM's plugin loader); if it is a hivis patch, hivis configs then fail at startup, naming it.
``VLLM_HIVIS_DISABLE_FIXES=all`` (or a comma list of patch names) skips the upstream / vllm-cpu
fixes, for a run that must match stock vLLM byte for byte.
"""

from __future__ import annotations

import functools
import logging
import os

from . import hivis, upstream, vllm_cpu  # noqa: F401  (importing them registers their patches)
from .helper import PatchError, patched_by, when_imported, wrap
from .registry import REGISTRY, Patch
from .version import SUPPORTED_VLLM, version_supported, vllm_version

logger = logging.getLogger("vllm_hivis.patches")

_applied: list[str] = []
_failed: dict[str, str] = {}
_scheduled: set[str] = set()
_warned_version = False


def _disabled_fixes() -> set[str]:
    raw = os.environ.get("VLLM_HIVIS_DISABLE_FIXES", "")
    if raw.strip() == "all":
        return {p.name for p in REGISTRY if p.reason != "hivis"}
    return {n.strip() for n in raw.split(",") if n.strip()}


def _apply(p: Patch) -> None:
    try:
        p.apply()
    except Exception as e:  # noqa: BLE001 - runs inside vLLM's import: a broken patch must not break vLLM
        # PatchError: a checked mismatch (signature, double patch). Anything else (a target missing
        # from a release the contract tests did not cover) is reported the same way, never raised.
        _failed[p.name] = str(e) if isinstance(e, PatchError) else f"{type(e).__name__}: {e}"
        logger.warning("vllm-hivis: patch %s not applied: %s", p.name, _failed[p.name])
        if p.reason == "hivis":
            when_imported("vllm.engine.arg_utils", functools.partial(_refuse_hivis, hivis_unavailable_reason))
        return
    _applied.append(p.name)
    logger.debug("vllm-hivis patch applied: %s (%s)", p.name, p.reason)


def apply_all() -> list[str]:
    """Schedule every patch of this vLLM once in this process (see module doc); returns the
    names of the patches applied so far."""
    global _warned_version
    version = vllm_version()
    if not version_supported(version):
        if not _warned_version:
            _warned_version = True
            logger.warning("vllm-hivis supports vLLM %s; vLLM %s is installed, so the plugin stays inert "
                           "(hivis configs will be refused)", " and ".join(SUPPORTED_VLLM), version)
            when_imported("vllm.engine.arg_utils", functools.partial(_refuse_hivis, hivis_unavailable_reason))
        return list(_applied)
    disabled = _disabled_fixes()
    for p in REGISTRY:
        if p.name in _scheduled or (p.reason != "hivis" and p.name in disabled):
            continue
        if p.versions is not None and version not in p.versions:
            continue
        _scheduled.add(p.name)
        when_imported(p.module, functools.partial(_apply, p))
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)


def failed() -> dict[str, str]:
    return dict(_failed)


def hivis_unavailable_reason() -> str | None:
    """Why this process cannot serve hivis (None: it can)."""
    version = vllm_version()
    if not version_supported(version):
        return (f"vllm-hivis supports vLLM {' and '.join(SUPPORTED_VLLM)}, but vLLM {version} is installed; "
                f"install one of those releases (GPU: pip install vllm=={SUPPORTED_VLLM[-1]})")
    broken = {n: e for n, e in _failed.items() if any(p.name == n and p.reason == "hivis" for p in REGISTRY)}
    if broken:
        return "vllm-hivis could not wire hivis into this vLLM: " + "; ".join(broken.values())
    return None


def _refuse_hivis(reason) -> None:
    """A pass-through ``EngineArgs.create_engine_config`` that refuses hivis configs with `reason()`
    (installed only where hivis cannot run: it works with any signature of the original)."""
    from vllm.engine.arg_utils import EngineArgs

    from ..serving.config import HiViSConfigError, requests_hivis

    if patched_by(EngineArgs, "create_engine_config") in ("accept_hivis_method", "refuse_hivis"):
        return  # accept_hivis_method checks hivis_unavailable_reason() itself

    def make(orig):
        def create_engine_config(self, *args, **kwargs):
            if requests_hivis(self):
                raise HiViSConfigError(reason())
            return orig(self, *args, **kwargs)

        return create_engine_config

    wrap(EngineArgs, "create_engine_config", make, patch="refuse_hivis", expect=None)  # any signature
