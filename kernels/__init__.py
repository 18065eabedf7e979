"""Triton kernels of fused_sigxent, installed as fused_sigxent.kernels."""
