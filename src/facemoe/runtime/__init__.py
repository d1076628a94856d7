"""Torch-free inference: backends, detection, alignment, tracking, gallery and the video pipeline.

Nothing under ``facemoe.runtime`` may import torch at module level: an edge box carries TensorRT or
ONNX Runtime, numpy and OpenCV only.
"""
