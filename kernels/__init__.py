"""Kernels and the custom ops the rewrite pass inserts.

``teal::sparse_linear`` (``sparse_linear.py``) is the op; ``sparse_gemv.py`` holds the Triton kernel it dispatches
to on CUDA, with its launcher and its reference side by side.
"""
from teal_fx.kernels.sparse_linear import reference_sparse_linear, sparse_linear, sparsify

__all__ = ["sparse_linear", "reference_sparse_linear", "sparsify"]
