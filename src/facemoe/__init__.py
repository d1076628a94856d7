"""FaceMoE Edge: FaceMoE from a PyTorch checkpoint to verified ONNX / TensorRT inference.

Sub-packages: ``model`` (PyTorch reference, needs torch), ``export`` (ONNX/TensorRT bundle),
``calibration`` (INT8 calibration data), ``runtime`` (torch-free inference and video pipeline),
``cli`` (command-line apps).
"""

__version__ = "0.1.0"
