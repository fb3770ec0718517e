"""Triton kernels with their pure-torch twins. Imports only torch and triton."""

from lynx.kernels.linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
