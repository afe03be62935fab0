"""The one way vllm-hivis changes vLLM: named, checked, logged attribute replacement.

``replace(owner, name, new, patch=..., expect=...)``
    - refuses a double patch: an attribute already replaced by *this* patch is left alone (the
      call is idempotent); one replaced by another patch raises `PatchError`, naming both;
    - checks the replaced callable's parameters (names, kinds, defaults; annotations ignored) against
      the ones the patch was written for (``expect``: one string, or a tuple of the strings of every
      supported vLLM version): a mismatch raises `PatchError` instead of wrapping a function whose
      contract changed;
    - keeps the original (``original(owner, name)``, and ``new.__wrapped__``);
    - logs what it replaced (DEBUG).
``wrap(owner, name, make, ...)`` is ``replace`` with ``new = make(original)``. A patch registered
with its targets (registry.py) gets ``expect`` from there: ``expect=REGISTERED`` (the default).
``when_imported(module, fn)`` runs ``fn`` right after ``module`` is first imported (now, if it
already is), so that registering the plugin imports no heavy vLLM module.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger("vllm_hivis.patches")

_MARK = "__vllm_hivis_patch__"
REGISTERED = object()  # expect=REGISTERED: the parameters the registered patch declares for this target
_originals: dict[tuple[int, str], object] = {}


class PatchError(RuntimeError):
    """A patch cannot be applied safely (double patch, or the target's signature changed)."""


def parameters(fn) -> str:
    """``"self, x, y=1, *args, z, **kw"``: a callable's parameters without annotations."""
    fn = fn.fget if isinstance(fn, property) else fn
    out, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star = True
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        prefix = "**" if p.kind is p.VAR_KEYWORD else ""
        out.append(prefix + p.name + ("" if p.default is p.empty else f"={p.default!r}"))
    return ", ".join(out)


def _current(owner, name: str):
    # the raw attribute (a property stays a property; a function in a class stays a function)
    return inspect.getattr_static(owner, name) if isinstance(owner, type) else getattr(owner, name)


def _marked(obj):
    return getattr(obj.fget if isinstance(obj, property) else obj, _MARK, None)


def _registered_expectation(patch: str, owner, name: str) -> str:
    from . import registry
    from .version import vllm_version

    target = f"{owner.__qualname__}.{name}" if isinstance(owner, type) else name
    p = registry.get(patch)
    if p is None or target not in p.targets:
        raise PatchError(f"patch {patch!r} does not declare its target {target!r} (registry.py)")
    return p.expected(target, vllm_version())


def replace(owner, name: str, new, *, patch: str, expect=REGISTERED) -> bool:
    """Set ``owner.name = new`` (see module doc). Returns False if this patch was already applied."""
    cur = _current(owner, name)
    who = _marked(cur)
    if who == patch:
        return False
    if who is not None:
        raise PatchError(f"{_label(owner, name)} is already patched by {who!r}; {patch!r} refuses to patch it again")
    if expect is REGISTERED:
        expect = _registered_expectation(patch, owner, name)
    if expect is not None:
        expected = (expect,) if isinstance(expect, str) else tuple(expect)
        got = parameters(cur)
        if got not in expected:
            raise PatchError(f"{patch}: {_label(owner, name)} has parameters ({got}), but the patch was written for "
                             f"({' | '.join(expected)}); this vLLM changed the function, so it is left unpatched")
    target = new.fget if isinstance(new, property) else new
    setattr(target, _MARK, patch)
    if not isinstance(new, property) and not hasattr(new, "__wrapped__"):
        new.__wrapped__ = cur
    _originals[(id(owner), name)] = cur
    setattr(owner, name, new)
    logger.debug("vllm-hivis patch %s replaced %s", patch, _label(owner, name))
    return True


def wrap(owner, name: str, make: Callable, *, patch: str, expect=REGISTERED) -> bool:
    """``replace(owner, name, make(original))``, the wrapper carrying the original's name and doc."""
    cur = _current(owner, name)
    if _marked(cur) == patch:
        return False
    orig = cur.fget if isinstance(cur, property) else (getattr(owner, name) if isinstance(cur, staticmethod) else cur)
    new = make(orig)
    if isinstance(cur, property):
        new = property(functools.wraps(orig)(new))
    else:
        new = functools.wraps(orig)(new)
    if isinstance(cur, staticmethod):
        new = staticmethod(new)
    return replace(owner, name, new, patch=patch, expect=expect)


def original(owner, name: str):
    """What ``owner.name`` was before vllm-hivis replaced it (the attribute itself if it never did)."""
    return _originals.get((id(owner), name), _current(owner, name))


def patched_by(owner, name: str) -> str | None:
    return _marked(_current(owner, name))


def _label(owner, name: str) -> str:
    qual = getattr(owner, "__qualname__", getattr(owner, "__name__", owner))
    return f"{getattr(owner, '__module__', '')}.{qual}.{name}"


class _PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module has been executed (first import only)."""

    def __init__(self):
        self.hooks: dict[str, list[Callable[[], None]]] = {}

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


def when_imported(module: str, fn: Callable[[], None]) -> None:
    """Run ``fn()`` once ``module`` is imported: now if it already is, else right after its import."""
    if module in sys.modules:
        fn()
        return
    if _hooks not in sys.meta_path:
        sys.meta_path.insert(0, _hooks)
    _hooks.hooks.setdefault(module, []).append(fn)
