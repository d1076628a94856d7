"""FaceMoE's TensorRT layer against NVIDIA's real Python bindings (run by .ci/trt_bindings.sh).

Runs with ``PYTHONPATH=<bindings target dir>:tests`` and ``LD_LIBRARY_PATH=<stand-in libraries>``: the
real ``tensorrt_bindings`` module imports on the stand-ins (tests/trt_bindings/standin_*.c), whose
factories return null like TensorRT's do when CUDA cannot start. Checks:

1. every ``trt.*`` / ``tensorrt.plugin`` name FaceMoE uses exists and accepts the call FaceMoE makes;
2. the capability probe and the network flags the builder computes, on the real enums;
3. ``trt.Builder`` / ``trt.Runtime`` without CUDA raise what the stand-in stack (tests/fakes) raises;
4. the SparseMoE plugin registers through the real ``tensorrt.plugin`` code into a recording registry, and
   the creator makes the AOT / JIT plugin for the ONNX parser's PREFER_AOT / PREFER_JIT requests (and
   refuses without a preference), with integer attributes passed as the parser passes them.

Usage: python check_tensorrt.py EXPECTED_VERSION (e.g. 10.13.3.9).

No ``from __future__ import annotations`` here: the probe plugin below must carry real annotations.
"""

import importlib
import sys
from typing import Any

import numpy as np

from trt_bindings.api_surface import PLUGIN, TENSORRT
from trt_bindings.surface import Report


class RecordingRegistry:
    """Stands in for TensorRT's plugin registry (a C++ object the stand-in library does not provide)."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        self.creators[(creator.name, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, namespace))


def check_project_code(report: Report, trt: Any, version: tuple[int, int]) -> None:
    from fakes.trt_stack import NULLPTR

    from facemoe.errors import FaceMoEError
    from facemoe.export import tensorrt as trt_build
    from facemoe.runtime.device import import_tensorrt

    report.item(import_tensorrt() is trt, "import_tensorrt() returns the real module")
    caps = trt_build.capabilities()
    expected = (version[0] < 11, version[0] >= 11, version[0] < 11)
    got = (caps.strongly_typed_flag and not caps.always_strongly_typed, caps.always_strongly_typed, caps.weak_fp16)
    report.item(got == expected, "capabilities(): typing and weak FP16", f"{caps}")
    report.item(caps.optimization_level and caps.plugin_registry_loader, "capabilities(): opt level, load_library")

    members = {name: int(value) for name, value in trt.NetworkDefinitionCreationFlag.__members__.items()}
    typed = 0 if version[0] >= 11 else 1 << members["STRONGLY_TYPED"]
    report.item(trt_build._network_flags(caps, False) == typed, "network flags: strongly typed", str(members))
    report.item(trt_build._network_flags(caps, True) == 0, "network flags: weakly typed")
    if version >= (10, 9):
        for mode in ("aot", "jit"):
            bit = 1 << members[f"PREFER_{mode.upper()}_PYTHON_PLUGINS"]
            flags = trt_build._network_flags(caps, False, mode)
            report.item(flags == typed | bit, f"network flags: prefer {mode}", f"{flags} != {typed | bit}")
    else:
        try:
            trt_build._network_flags(caps, False, "aot")
            report.item(False, "network flags: AOT refused before 10.9", "no error")
        except FaceMoEError:
            report.item(True, "network flags: AOT refused before 10.9")

    messages: list[tuple[int, str]] = []
    logger = trt_build._logger(False, messages)
    logger.log(trt.ILogger.Severity.ERROR, "probe")
    report.item(isinstance(logger, trt.ILogger) and messages == [(1, "probe")], "capturing logger", str(messages))

    for factory in (trt.Builder, trt.Runtime):
        try:
            factory(trt.Logger(trt.Logger.WARNING))
            report.item(False, f"{factory.__name__} without CUDA", "constructed")
        except TypeError as exc:
            report.item(NULLPTR in str(exc), f"{factory.__name__} without CUDA raises the stand-ins' error", str(exc))


def _fields(trt: Any, dtype: Any, kind: Any, **values: int) -> Any:
    return trt.PluginFieldCollection([trt.PluginField(k, np.array([v], dtype), kind) for k, v in values.items()])


def check_plugin(report: Report, trt: Any, version: tuple[int, int]) -> None:
    from facemoe.gating import trt_plugin

    module = trt_plugin.plugin_module()
    if version < (10, 6):
        report.item(module is None or not trt_plugin.available(), "no plugin API before 10.6")
        report.item(trt_plugin.register() == frozenset(), "register() reports nothing registered before 10.6")
        return
    report.item(module is not None, "plugin API found", "tensorrt.plugin / tensorrt_bindings.plugin")
    if module is None:
        return
    report.note(f"plugin API is {module.__name__}")
    try:
        importlib.import_module("tensorrt.plugin")
        has_alias = True
    except ImportError:
        has_alias = False
    report.note(f"`import tensorrt.plugin` {'works' if has_alias else 'fails'} here")
    report.surface(module, PLUGIN, version)

    registry = RecordingRegistry()
    trt.get_plugin_registry = lambda: registry  # the plugin code calls tensorrt.get_plugin_registry()
    registered = trt_plugin.register(aot=True)
    want = frozenset({"jit", "aot"}) if version >= (10, 9) else frozenset({"jit"})
    report.item(registered == want, "register(): implementations", f"{sorted(registered)} != {sorted(want)}")
    creator = registry.creators.get(("SparseMoE", "facemoe"))
    report.item(creator is not None, "creator facemoe::SparseMoE recorded", str(list(registry.creators)))
    if creator is None:
        return
    fields = [(f.name, f.type) for f in creator.field_names]
    int32 = trt.PluginFieldType.INT32
    report.item(fields == [("k", int32), ("num_experts", int32)], "creator fields k, num_experts (INT32)", str(fields))
    # The parser passes each integer attribute as a one-element array of the declared field type.
    attrs = _fields(trt, np.int32, int32, k=2, num_experts=3)
    phase = trt.TensorRTPhase.BUILD
    if version >= (10, 9):
        request = trt.QuickPluginCreationRequest
        for name, kind in (("PREFER_AOT", "AOT"), ("PREFER_JIT", "JIT")):
            plugin = creator.create_plugin("SparseMoE", "facemoe", attrs, phase, getattr(request, name))
            report.item(kind in type(plugin).__name__, f"create_plugin({name})", type(plugin).__name__)
        try:
            creator.create_plugin("SparseMoE", "facemoe", attrs, phase, request.UNKNOWN)
            report.item(False, "create_plugin without a preference is refused", "accepted")
        except ValueError as exc:
            report.item("PREFER_AOT_PYTHON_PLUGINS" in str(exc), "create_plugin without a preference is refused")
    else:
        plugin = creator.create_plugin("SparseMoE", "facemoe", attrs, phase)  # 10.6-10.8: JIT is the only kind
        name = type(plugin).__name__
        report.item(name in ("_TemplatePlugin", "_TemplateJITPlugin"), "create_plugin (JIT only)", name)
    check_plugin_hazards(report, trt, module, version)


def check_plugin_hazards(report: Report, trt: Any, trtp: Any, version: tuple[int, int]) -> None:
    """The two traps trt_plugin.py avoids, shown on this version's real code."""
    # String annotations (what `from __future__ import annotations` makes) are refused at registration.
    namespace: dict[str, Any] = {}
    exec("def describe(x: 'trtp.TensorDesc', k: 'int') -> 'trtp.TensorDesc':\n    return x.like()\n", namespace)
    try:
        trtp.register("facemoe_probe::Strings")(namespace["describe"])
        report.item(False, "string annotations are refused by tensorrt.plugin", "accepted")
    except Exception as exc:  # TypeError (10.x) or ValueError (11.x)
        report.item(True, "string annotations are refused by tensorrt.plugin")
        report.note(f"string annotations: {type(exc).__name__}: {exc}")

    # A builtin-int attribute goes through int(array) on 10.6 to 11.0, which numpy >= 2.4 refuses.
    def describe(x: trtp.TensorDesc, k: int) -> trtp.TensorDesc:
        return x.like()

    trtp.register("facemoe_probe::IntAttr")(describe)
    creator = trt.get_plugin_registry().get_creator("IntAttr", "1", "facemoe_probe")
    attrs = _fields(trt, np.int64, trt.PluginFieldType.INT64, k=2)
    try:
        creator.create_plugin("IntAttr", "facemoe_probe", attrs, trt.TensorRTPhase.BUILD)
        outcome = "works"
    except TypeError as exc:
        outcome = f"fails ({exc})"
    report.note(f"builtin int attribute with numpy {np.__version__}: {outcome}")
    numpy_24 = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)
    if numpy_24 and version < (11, 0):
        report.item(outcome != "works", "builtin int attributes break on this TensorRT with numpy >= 2.4")


def main() -> int:
    expected = sys.argv[1]
    report = Report(f"TensorRT bindings {expected}")
    import tensorrt as trt

    version = tuple(int(p) for p in str(trt.__version__).split(".")[:2])
    report.item(str(trt.__version__).startswith(expected), "version", f"{trt.__version__} != {expected}")
    report.note(f"tensorrt from {trt.__file__}; bindings {sys.modules['tensorrt_bindings'].__file__}")
    report.surface(trt, TENSORRT, version)  # type: ignore[arg-type]
    check_project_code(report, trt, version)  # type: ignore[arg-type]
    check_plugin(report, trt, version)  # type: ignore[arg-type]
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
