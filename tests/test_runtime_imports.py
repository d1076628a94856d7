"""Every ``facemoe.runtime`` module imports on an edge box: no PyTorch, no extras, nothing from ``export/``.

The package layering (docs/ARCHITECTURE.md#package-layering) keeps the runtime torch-free. The modules are
found by walking the package, so a new module is checked without being listed here. It runs in a
subprocess with the extras blocked (``sys.modules[name] = None``: what an absent package looks like to
``import``), so this test process keeps its own torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import facemoe.runtime

from runtime_only import EXTRA_MODULES

RUNTIME = Path(facemoe.runtime.__file__).parent

# Modules allowed to need torch at import time: only the PyTorch backend, which exists to run the torch
# model. Today it imports torch inside functions, so it imports without torch too and a missing torch
# becomes a BackendUnavailable when it is opened; if it ever imports torch at module level, the only
# accepted failure is the ModuleNotFoundError for torch itself (anything else fails the test).
NEEDS_TORCH = {"facemoe.runtime.backends.torch_backend"}

# Imports of facemoe.export from runtime/: none (docs/ARCHITECTURE.md#package-layering). Building an engine,
# the one step that needs both, is facemoe.deploy's.
KNOWN_EXPORT_IMPORTS: set[tuple[str, str]] = set()

SCRIPT = f"""
import importlib, json, pkgutil, sys
for name in {EXTRA_MODULES!r}:
    sys.modules[name] = None
import facemoe.runtime as runtime
failed = {{}}
names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "facemoe.runtime.")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
loaded = sorted(m for m in sys.modules if m.startswith("facemoe.") and sys.modules[m] is not None)
print(json.dumps({{"names": names, "failed": failed, "loaded": loaded}}))
"""


def test_every_runtime_module_imports_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    files = [p for p in RUNTIME.rglob("*.py") if p.name != "__init__.py"]
    assert len(report["names"]) >= len(files) >= 15, "the package walk missed modules"
    failed = {
        name: why
        for name, why in report["failed"].items()
        if not (name in NEEDS_TORCH and why.startswith("ModuleNotFoundError: import of torch halted"))
    }
    assert not failed, failed
    # Importing the runtime pulls in neither the exporter nor the PyTorch model.
    heavy = [m for m in report["loaded"] if m.split(".")[1] in ("export", "model", "kernels", "calibration")]
    assert not heavy, heavy


def _export_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "facemoe.export" or n.startswith("facemoe.export."))
    return found


def test_no_new_runtime_import_of_export() -> None:
    found = {
        (path.relative_to(RUNTIME).as_posix(), module)
        for path in RUNTIME.rglob("*.py")
        for module in _export_imports(path)
    }
    assert found <= KNOWN_EXPORT_IMPORTS, sorted(found - KNOWN_EXPORT_IMPORTS)
