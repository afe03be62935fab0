"""The ``vllm.general_plugins`` entry point: vLLM calls `register()` in every process it starts.

Cheap and idempotent: schedules the patches (patches/; each waits for its vLLM module) and
registers the drafter architecture by lazy name (no model import). On a vLLM release the plugin
does not support it stays inert: one warning, no patch, no drafter (patches/__init__.py).
"""

from __future__ import annotations

DRAFTER_CLASS = "vllm_hivis.serving.drafter:HiViSDrafterForCausalLM"
# vLLM inspects the raw name (draft ModelConfig) and, after its EAGLEConfig wrap, "Eagle" + name.
ARCHITECTURES = ("HiViSDrafterForCausalLM", "EagleHiViSDrafterForCausalLM")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from . import patches

    patches.apply_all()
    if patches.version_supported():
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
        for arch in ARCHITECTURES:
            if arch not in supported:
                ModelRegistry.register_model(arch, DRAFTER_CLASS)
    _registered = True
