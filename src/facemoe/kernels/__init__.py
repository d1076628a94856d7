"""Former home of the GPU kernels; they live in :mod:`facemoe.gating.triton` (``sparse_moe_triton`` re-exports)."""
