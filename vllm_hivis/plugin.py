"""The ``vllm.general_plugins`` entry point: vLLM calls `register()` in every process it starts.

Cheap and idempotent: registers the drafter architecture by lazy name (no model import) and
applies the audited patches (patches.py), which check the pinned vLLM version first.
"""

from __future__ import annotations

DRAFTER_CLASS = "vllm_hivis.drafter:HiViSDrafterForCausalLM"
# vLLM inspects the raw name (draft ModelConfig) and, after its EAGLEConfig wrap, "Eagle" + name.
ARCHITECTURES = ("HiViSDrafterForCausalLM", "EagleHiViSDrafterForCausalLM")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import patches

    patches.apply_all()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, DRAFTER_CLASS)
    _registered = True
