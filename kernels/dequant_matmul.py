"""Launcher of the prefill GEMM on quantized weights (``dequant_matmul_triton.py``): any number of rows, int8 or
int4 weights as kernels/quantize.py stores them. Tested against ``reference.py`` in tests/test_quantized.py."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from teal_fx.kernels.quantize import INT4_GROUP, logical_shape, weight_format
from teal_fx.kernels.triton_support import DTYPES, HAS_TRITON, interpreter_upcasts

if HAS_TRITON:
    import triton

    from teal_fx.kernels import dequant_matmul_triton as jit


def supports(x: Tensor, weight: Tensor) -> bool:
    return HAS_TRITON and x.is_cuda and weight.is_cuda and x.dtype in DTYPES and weight_format(weight) is not None


def dequant_matmul(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor], *, block_m: int = 64,
                   block_n: int = 128, block_k: int = 64, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """y = x Wᵀ + b, W the dequantized ``weight``; x [..., K]."""
    N, K = logical_shape(weight)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    wfmt = 1 if weight_format(weight) == "int8" else 2
    if INT4_GROUP % block_k:
        raise ValueError(f"block_k must divide the int4 group ({INT4_GROUP})")
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    jit.dequant_matmul_kernel[grid](
        x2, weight, scales, bias if bias is not None else x2, y, M, N, K, x2.stride(0), weight.stride(0),
        weight.stride(1), scales.stride(0) if wfmt == 2 and scales.shape[0] > 1 else 0, y.stride(0),
        BM=block_m, BN=block_n, BK=block_k, HAS_BIAS=bias is not None, WFMT=wfmt, GROUP=INT4_GROUP,
        UPCAST=interpreter_upcasts(x.dtype), IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return y.reshape(*x.shape[:-1], N)
