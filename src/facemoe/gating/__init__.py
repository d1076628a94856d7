"""The ``facemoe::SparseMoE`` op as one unit: one ONNX node for a whole MoE block (docs/GATING_OP.md).

* :mod:`facemoe.gating.spec`: the contract (domain, version, inputs, attributes, supported shapes); no imports.
* :mod:`facemoe.gating.torch_op`: the reference function and the autograd op that traces to the node (torch).
* :mod:`facemoe.gating.ort`: the ONNX Runtime kernel and its registration (numpy; torch never imported).
* :mod:`facemoe.gating.onnx_graph`: ONNX graph helpers (naming the node's weights, finding the node).
* :mod:`facemoe.gating.triton`: the GPU kernels (torch + triton; import lazily).

The package sits below the model, the export and the runtime (docs/ARCHITECTURE.md): it imports nothing
from them, so each can use it without an import cycle. This module imports nothing heavy.
"""

from facemoe.gating.spec import DOMAIN, OP_TYPE, OP_VERSION, plugin_support_problems

__all__ = ["DOMAIN", "OP_TYPE", "OP_VERSION", "plugin_support_problems"]
