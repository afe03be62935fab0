"""Which vLLM releases the plugin supports, and which one is running."""

from __future__ import annotations

import os

SUPPORTED_VLLM = ("0.32.0", "0.33.0")


def vllm_version() -> str:
    """The installed vLLM's release, without local suffixes ('0.32.0+cpu' -> '0.32.0')."""
    import vllm

    return vllm.__version__.split("+")[0]


def version_supported(version: str | None = None) -> bool:
    """True for the supported releases (and for any, with ``VLLM_HIVIS_SKIP_VERSION_CHECK=1``)."""
    if os.environ.get("VLLM_HIVIS_SKIP_VERSION_CHECK") == "1":
        return True
    return (version or vllm_version()) in SUPPORTED_VLLM
