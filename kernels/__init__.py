"""Kernels and the custom ops the rewrite pass inserts.

``teal::sparse_linear`` (``sparse_linear.py``) is the op; ``sparse_gemv.py`` holds the Triton kernel it dispatches
to on CUDA, with its launcher and its reference side by side.
"""
if __name__ != "teal_fx.kernels":
    # Imported as a top-level ``kernels`` because the repository root is on sys.path (``python -c`` there):
    # transformers probes for the Hub's ``kernels`` package exactly so. Look like an empty namespace package
    # (no __file__), which the probe reads as "not installed", instead of importing teal_fx half-way.
    del globals()["__file__"]
else:
    from teal_fx.kernels.sparse_linear import reference_sparse_linear, sparse_linear, sparse_linear_group, sparsify

    __all__ = ["sparse_linear", "sparse_linear_group", "reference_sparse_linear", "sparsify"]
