"""GPU kernels (torch + triton, imported lazily): ``facemoe.kernels.sparse_moe_triton``."""
