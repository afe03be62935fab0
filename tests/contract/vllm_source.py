"""Static contract checks of a vLLM source tree: what the plugin patches and uses must exist there
with the parameters it was written for. Reads the sources with ``ast`` only (a GPU wheel's compiled
parts need not import on this machine), so CI can check every supported vLLM release from its
wheel's Python files (scripts/vllm_sources.sh) without installing it.

``source_params(root, module, qualname)`` -> the parameter string (the format of
patches.helper.parameters) of a function, method or property, following ``from X import name``
re-exports; ``class_names(root, module, qualname)`` -> the attribute names a class body declares
(fields, methods) plus every ``self.<name> =`` assigned in its methods.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path


class ContractError(LookupError):
    pass


@functools.cache
def _module_ast(root: str, module: str) -> ast.Module:
    base = Path(root).joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return ast.parse(path.read_text(), filename=str(path))
    raise ContractError(f"module {module} not found under {root}")


def _find(body, name: str):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
    # later definitions win (e.g. a function redefined after an import): search in reverse
    for node in reversed(body):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    return None


def _imported_from(tree: ast.Module, module: str, name: str) -> tuple[str, str] | None:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    src = node.module or ""
                    if node.level:  # relative import
                        pkg = module.split(".")
                        pkg = pkg[: len(pkg) - node.level + (1 if _is_package(module) else 0)]
                        src = ".".join(pkg + ([node.module] if node.module else []))
                    return src, alias.name
    return None


_PACKAGES: set[str] = set()


def _is_package(module: str) -> bool:
    return module in _PACKAGES


def resolve(root: str, module: str, qualname: str):
    """The AST node of ``module.qualname`` (a def, class or assignment), following re-exports."""
    tree = _module_ast(root, module)
    if Path(root).joinpath(*module.split("."), "__init__.py").is_file():
        _PACKAGES.add(module)
    head, *rest = qualname.split(".")
    node = _find(tree.body, head)
    if node is None:
        src = _imported_from(tree, module, head)
        if src is None:
            raise ContractError(f"{module}.{head} is not defined in {root}")
        return resolve(root, src[0], ".".join([src[1], *rest]))
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            raise ContractError(f"{module}.{qualname}: {part!r} looked up in a non-class")
        child = _find(node.body, part)
        if child is None:
            raise ContractError(f"{module}.{qualname} is not defined in {root}")
        node = child
    return node


def params_of(fn: ast.FunctionDef) -> str:
    """``"self, x, y=1, *args, z, **kw"`` of an AST function (the format of helper.parameters)."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [p.arg + ("" if d is None else "=" + ast.unparse(d)) for p, d in zip(positional, defaults)]
    if a.vararg:
        out.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        out.append("*")
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append(p.arg + ("" if d is None else "=" + ast.unparse(d)))
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return ", ".join(out)


def source_params(root: str, module: str, qualname: str) -> str:
    node = resolve(root, module, qualname)
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise ContractError(f"{module}.{qualname} is not a function in {root}")
    return params_of(node)


def class_names(root: str, module: str, qualname: str) -> set[str]:
    node = resolve(root, module, qualname)
    if not isinstance(node, ast.ClassDef):
        raise ContractError(f"{module}.{qualname} is not a class in {root}")
    names: set[str] = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    for sub in ast.walk(node):
        targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(
            sub, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def source_text(root: str, module: str, qualname: str) -> str:
    return ast.unparse(resolve(root, module, qualname))
