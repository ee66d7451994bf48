"""Kernels and the custom ops the rewrite passes insert, by layer:

    ops.py                     torch.library registrations of teal::* (fakes, autograd), dispatching to:
    sparse_gemv.py             launchers of the sparse GEMV (one, grouped, SwiGLU, add + RMSNorm, the MLP with
                               both, q/k/v + RoPE, the sums left for the next launch)
      sparse_gemv_config.py    its launch config, a typed value, and the rule that picks it
      sparse_gemv_triton.py    its jitted Triton kernels
        x_int8_triton.py       their loops with x rounded to int8 (dp4a; a plan's activations="int8")
    decode_attention.py        launcher (and config) of the decode attention, also from q/k/v sums
      decode_attention_triton.py   its jitted Triton kernel
    quantize.py                int8 / int4 weight formats and the QuantizedLinear module that holds them
    dequant_matmul.py          launcher of the prefill GEMM on quantized weights
      dequant_matmul_triton.py     its jitted Triton kernel
    int_weights_triton.py      int8 / int4 values to floats in Triton, for both GEMV and GEMM
    reference.py               the one reference implementation of every op (CPU, prefill, tests)
    pdl.py, workspace.py, triton_support.py   what the launchers share

Importing ``teal_fx.kernels`` registers ``torch.ops.teal.*``.
"""
if __name__ != "teal_fx.kernels":
    # Imported as a top-level ``kernels`` because the repository root is on sys.path (``python -c`` there):
    # transformers probes for the Hub's ``kernels`` package exactly so. Look like an empty namespace package
    # (no __file__), which the probe reads as "not installed", instead of importing teal_fx half-way.
    del globals()["__file__"]
else:
    # (the decode attention op is torch.ops.teal.decode_attention: ``teal_fx.kernels.decode_attention`` stays the
    # launcher's module)
    from teal_fx.kernels.ops import (
        sparse_linear,
        sparse_linear_add_rmsnorm,
        sparse_linear_group,
        sparse_linear_qkv_rope,
        sparse_mlp_add_rmsnorm,
        sparse_qkv_rope_attention,
        sparse_swiglu,
    )
    from teal_fx.kernels.reference import (
        reference_decode_attention,
        reference_qkv_rope_,
        reference_rmsnorm,
        reference_sparse_linear,
        reference_swiglu,
        sparsify,
    )

    __all__ = ["sparse_linear", "sparse_linear_group", "sparse_swiglu", "sparse_linear_add_rmsnorm",
               "sparse_mlp_add_rmsnorm", "sparse_linear_qkv_rope", "sparse_qkv_rope_attention",
               "reference_sparse_linear", "reference_swiglu", "reference_rmsnorm", "reference_decode_attention",
               "reference_qkv_rope_", "sparsify"]
