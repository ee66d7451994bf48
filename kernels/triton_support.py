"""What every Triton launcher here shares: whether Triton is importable, and small helpers."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional extra on CPU
    HAS_TRITON = False

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_upcasts(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast bf16 operands of ``tl.dot``: the CPU interpreter mis-computes bf16 dots."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def inline_ptx(device: torch.device) -> bool:
    """Whether a kernel may use inline PTX: an NVIDIA GPU, not the CPU interpreter (nor a ROCm build)."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())
