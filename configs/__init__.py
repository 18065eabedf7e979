"""Autotune candidate configs, one JSON file per kernel (read by fused_sigxent.kernels._configs)."""
