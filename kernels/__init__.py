"""Kernels and the custom ops the rewrite pass inserts.

``teal::sparse_linear`` (``sparse_linear.py``) is the op; ``sparse_gemv.py`` holds the Triton kernel it dispatches
to on CUDA, with its launcher and its reference side by side. ``teal::decode_attention`` (``decode_attention.py``:
op, kernel, launcher, reference) replaces sdpa in decode steps.
"""
if __name__ != "teal_fx.kernels":
    # Imported as a top-level ``kernels`` because the repository root is on sys.path (``python -c`` there):
    # transformers probes for the Hub's ``kernels`` package exactly so. Look like an empty namespace package
    # (no __file__), which the probe reads as "not installed", instead of importing teal_fx half-way.
    del globals()["__file__"]
else:
    # (the submodule stays reachable as ``teal_fx.kernels.decode_attention``; its op is torch.ops.teal.decode_attention)
    from teal_fx.kernels.decode_attention import reference_decode_attention
    from teal_fx.kernels.sparse_linear import (reference_rmsnorm, reference_sparse_linear, sparse_linear,
                                              sparse_linear_add_rmsnorm, sparse_linear_group, sparse_swiglu, sparsify)

    __all__ = ["sparse_linear", "sparse_linear_group", "sparse_swiglu", "sparse_linear_add_rmsnorm",
               "reference_sparse_linear", "reference_rmsnorm", "sparsify", "reference_decode_attention"]
