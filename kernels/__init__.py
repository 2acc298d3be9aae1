"""Triton kernels: ``@triton.jit`` functions and their launch helpers.

Importing ``kernels.fixnorm_triton`` needs Triton; nothing here is imported by
``import fixnorm_ext``.
"""
