"""The real-bindings check's table stays complete, and its signature reader reads what the bindings write.

The check itself (tests/trt_bindings/, .ci/trt_bindings.sh) needs NVIDIA's wheels and a C compiler; this
part runs everywhere.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

from trt_bindings.api_surface import CUDART, PLUGIN, SOURCES, TENSORRT, Use
from trt_bindings.surface import accepts, check, documented_signatures

ROOT = Path(__file__).resolve().parents[1]


def test_every_tensorrt_name_in_the_source_is_checked() -> None:
    listed = {u.path for u in TENSORRT} | {f"plugin.{u.path}" for u in PLUGIN}
    prefixes = {p for path in listed for p in (".".join(path.split(".")[: i + 1]) for i in range(path.count(".") + 1))}
    used = set()
    for source in SOURCES:
        text = (ROOT / source).read_text()
        for module, path in re.findall(r"\b(trtp?)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", text):
            path = path.removesuffix(".__init__")
            used.add(path if module == "trt" else f"plugin.{path}")
    assert len(used) > 30, used  # the scan finds the names
    missing = sorted(u for u in used if u not in prefixes)
    assert not missing, f"add to tests/trt_bindings/api_surface.py: {missing}"


def test_every_cuda_runtime_call_in_the_backend_is_checked() -> None:
    text = (ROOT / "src/facemoe/runtime/backends/cuda_runtime.py").read_text()
    text += (ROOT / "src/facemoe/runtime/device.py").read_text()
    used = set(re.findall(r"(?:_rt|cudart)\.(cuda\w+)", text))
    listed = {u.path.split(".")[0] for u in CUDART}
    assert used and used <= listed, sorted(used - listed)


def test_signature_reader_on_binding_docstrings() -> None:
    pybind = types.SimpleNamespace(
        __doc__="set_timing_cache(self: tensorrt.IBuilderConfig, cache: tensorrt.ITimingCache, "
        "ignore_mismatch: bool) -> bool\n\nAttach a timing cache"
    )
    (params,) = documented_signatures(pybind, "set_timing_cache")
    assert [p.name for p in params] == ["cache", "ignore_mismatch"]
    assert accepts(params, 2, ()) and not accepts(params, 1, ()) and not accepts(params, 3, ())
    overloaded = types.SimpleNamespace(
        __doc__="create_execution_context(*args, **kwargs)\nOverloaded function.\n\n"
        "1. create_execution_context(self: ICudaEngine, strategy: ExecutionContextAllocationStrategy = "
        "<ExecutionContextAllocationStrategy.STATIC: 0>) -> IExecutionContext\n"
    )
    (params,) = documented_signatures(overloaded, "create_execution_context")
    assert accepts(params, 0, ()) and accepts(params, 1, ()) and accepts(params, 0, ("strategy",))
    cython = types.SimpleNamespace(__doc__="cudaGraphInstantiate(graph, unsigned long long flags)\n\nInstantiate")
    (params,) = documented_signatures(cython, "cudaGraphInstantiate")
    assert [p.name for p in params] == ["graph", "flags"] and accepts(params, 2, ())


def test_check_reports_missing_names_and_bad_calls() -> None:
    class Config:
        def set_flag(self, flag: int) -> None: ...

        @property
        def level(self) -> int:
            return 3

    module = types.SimpleNamespace(IBuilderConfig=Config)
    assert check(module, Use("IBuilderConfig.set_flag", args=1)) is None  # type: ignore[arg-type]
    assert "signatures: (flag)" in (check(module, Use("IBuilderConfig.set_flag", args=2)) or "")  # type: ignore[arg-type]
    assert check(module, Use("IBuilderConfig.level", prop=True)) is None  # type: ignore[arg-type]
    assert "missing" in (check(module, Use("IBuilderConfig.gone")) or "")  # type: ignore[arg-type]
