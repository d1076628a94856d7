"""Check names and call shapes against a real binding module (pybind11 TensorRT, Cython cuda-python).

A call shape is checked against the signatures the binding documents: pybind11 writes
``name(self: T, a: X, b: Y = ...) -> R`` (one numbered line per overload), Cython
``name(a, unsigned long long b)``. Pure-Python objects are checked with ``inspect.signature``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from trt_bindings.api_surface import Use


@dataclass
class Param:
    name: str
    has_default: bool
    variadic: bool = False


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([<{":
            depth += 1
        elif char in ")]>}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _param(text: str) -> Param:
    if text.startswith("*"):
        return Param(text.lstrip("*").split(":")[0].strip(), True, variadic=True)
    head, _, default = text.partition("=")
    name = head.split(":")[0].strip().split()[-1] if head.strip() else ""
    return Param(name, bool(default.strip()))


def documented_signatures(obj: Any, name: str) -> list[list[Param]]:
    """Parameter lists in ``obj``'s docstring for ``name`` (``self`` dropped); [] when none is written."""
    doc = inspect.getdoc(obj) or ""
    pattern = re.compile(rf"^\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)(?:\s*->.*)?\s*$")
    found = []
    for line in doc.splitlines():
        match = pattern.match(line)
        if match is None or match.group(1).strip() == "*args, **kwargs":
            continue
        params = [_param(p) for p in _split_top_level(match.group(1))]
        found.append([p for p in params if p.name != "self"])
    return found


def _python_signature(obj: Any) -> list[list[Param]]:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = []
    for p in signature.parameters.values():
        if p.name == "self":
            continue
        variadic = p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        params.append(Param(p.name, p.default is not p.empty or variadic, variadic))
    return [params]


def accepts(params: list[Param], args: int, kwargs: tuple[str, ...]) -> bool:
    if any(p.variadic for p in params):
        return True
    plain = [p for p in params if not p.variadic]
    required = sum(1 for p in plain if not p.has_default)
    names = {p.name for p in plain[args:]}
    return args <= len(plain) and required <= args + len(kwargs) and set(kwargs) <= names


def resolve(module: ModuleType, path: str) -> tuple[Any, Any, str]:
    """(owner, object, last name) for a dotted ``path`` under ``module``; AttributeError when missing."""
    owner: Any = module
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, getattr(owner, parts[-1]), parts[-1]


def check(module: ModuleType, use: Use) -> str | None:
    """None when ``use`` holds for ``module``, else what is wrong."""
    try:
        owner, obj, name = resolve(module, use.path)
    except AttributeError as exc:
        return f"missing ({exc})"
    if use.prop:
        descriptor = inspect.getattr_static(owner, name, None)
        kinds = ("property", "getset_descriptor", "member_descriptor")
        if type(descriptor).__name__ not in kinds and not isinstance(descriptor, property):
            return f"expected a property, found {type(descriptor).__name__}"
        return None
    if use.args is None:
        return None
    if not callable(obj):
        return f"expected a callable, found {type(obj).__name__}"
    target, doc_name = (obj.__init__, "__init__") if inspect.isclass(obj) else (obj, name)
    signatures = documented_signatures(target, doc_name) or _python_signature(target)
    if not signatures:
        return "no signature documented to check against"
    if any(accepts(params, use.args, use.kwargs) for params in signatures):
        return None
    shown = " | ".join("(" + ", ".join(p.name for p in params) + ")" for params in signatures)
    return f"called with {use.args} positional {list(use.kwargs)} keyword arguments; signatures: {shown}"


class Report:
    """Collects PASS / FAIL lines; ``failed`` decides the exit status."""

    def __init__(self, title: str) -> None:
        self.title, self.failed, self.passed = title, 0, 0

    def item(self, ok: bool, what: str, detail: str = "") -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"  FAIL {what}: {detail}", flush=True)

    def note(self, text: str) -> None:
        print(f"  note {text}", flush=True)

    def surface(self, module: ModuleType, uses: tuple[Use, ...], version: tuple[int, int]) -> None:
        for use in uses:
            if use.applies(version):
                problem = check(module, use)
                self.item(problem is None, use.path, problem or "")

    def finish(self) -> int:
        print(f"{self.title}: {self.passed} checks passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0
