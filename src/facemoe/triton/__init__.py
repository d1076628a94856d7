"""Model repositories for NVIDIA Triton Inference Server, written from a facemoe bundle.

Not OpenAI's Triton language (``facemoe.gating.triton`` holds those kernels); absolute imports keep
``import triton`` meaning OpenAI's package everywhere. The serve repository (facemoe.triton.serve) runs the
bundle on facemoe's own backends inside Triton's Python backend; the GPU repository
(facemoe.triton.gpu) uses Triton's onnxruntime and tensorrt backends (docs/SCALE_OUT.md#repositories).
"""
