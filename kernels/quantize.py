"""Quantized weight formats for the sparse GEMV, and the module that holds one in place of an ``nn.Linear``.

    int8   q [N, K] int8, stored column-major (strides (1, N)); scales [N]: W ≈ q * scales[:, None]
    int4   q [N / 2, K] uint8, stored column-major; byte (j, k) holds outputs 2j (low nibble) and 2j + 1 (high) of
           input k as w / s + 8 in [0, 15]; scales [ceil(K / 128), N]: W[n, k] ≈ (nibble - 8) * scales[k // 128, n]

Why these layouts: as for bf16 (``to_column_major_``), input k's weights are one contiguous row (N bytes for int8,
N / 2 for int4), so an input the threshold drops skips contiguous memory. int4 packs along N for the same reason
(packing along K would put two inputs, kept or not, in one byte).

Why symmetric int4 (no zero point): a group's weights are close to zero-mean, so a zero point buys little accuracy
and costs a second [K / 128, N] tensor to read and one more operation per column and group. The scale puts the
group's extreme on the end of the grid of its sign: absmax / 8 where it is negative (it becomes -8, nibble 0),
absmax / 7 where it is positive, so half the groups get a finer grid and no extreme is clipped (a positive value
above 7/8 of a negative extreme is). Against absmax / 7 everywhere, dense perplexity on WikiText-2: SmolLM2-135M
36.24 -> 34.26, Qwen2.5-Coder-0.5B 36.65 -> 35.68. Scales that minimise each group's squared error clip extremes and
did worse (38.75), the smallest scale that clips nothing barely better (36.09; docs/perf-log.md v37). Scales are
kept in the weight's own dtype (bf16 on a GPU): 1/64 of int4's bytes. int8 is symmetric per output channel,
absmax / 127, the scheme of gpt-fast and torchao's weight-only.

The kernels never dequantize a whole matrix: the GEMV scales its sums (int8 once per column, int4 once per tile of
one group); prefill on a GPU runs ``dequant_matmul`` (tiles dequantized in registers).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

FORMATS = ("int8", "int4")
INT4_GROUP = 128
ACT_TILE = 32  # W8A8: inputs per int8 scale of x (the GEMV's weight_math 3; kernels/reference.py)
_DTYPE_OF = {"int8": torch.int8, "int4": torch.uint8}


def weight_format(weight: Tensor) -> Optional[str]:
    """"int8", "int4" or None (a float weight) for a weight as the teal ops take it."""
    if weight.dtype == torch.int8:
        return "int8"
    if weight.dtype == torch.uint8:
        return "int4"
    return None


def logical_shape(weight: Tensor) -> tuple[int, int]:
    """(out_features, in_features) of a float, int8 or packed int4 weight."""
    n, k = weight.shape
    return (2 * n, k) if weight.dtype == torch.uint8 else (n, k)


def _column_major(t: Tensor) -> Tensor:
    return t.t().contiguous().t()


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q [N, K] int8 column-major, scales [N] in the weight's dtype), per output channel, symmetric."""
    w = weight.detach()
    scales = (w.abs().amax(dim=1).float() / 127.0).clamp_min(1e-12)
    q = torch.round(w.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return _column_major(q), scales.to(w.dtype)


@torch.no_grad()
def quantize_int4(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """(q [N / 2, K] uint8 column-major, two outputs a byte; scales [ceil(K / group), N]), symmetric per group, each
    group's extreme at the end of the grid of its sign (-8 or 7)."""
    N, K = weight.shape
    if N % 2:
        raise ValueError(f"int4 packs two output channels a byte: out_features must be even, got {N}")
    w = weight.detach().float()
    G = -(-K // group)
    padded = torch.nn.functional.pad(w, (0, G * group - K)).reshape(N, G, group)
    negative = -padded.amin(dim=2) > padded.amax(dim=2)  # [N, G]: the extreme is negative
    scales = (padded.abs().amax(dim=2) / torch.where(negative, 8.0, 7.0)).clamp_min(1e-12)
    s = scales.to(weight.dtype).float()  # quantize against the scales the kernel will read
    q = torch.round(padded / s[:, :, None]).clamp_(-8, 7).reshape(N, G * group)[:, :K].to(torch.int32) + 8
    packed = (q[0::2] | (q[1::2] << 4)).to(torch.uint8)  # [N / 2, K]
    return _column_major(packed), s.t().contiguous().to(weight.dtype)


def dequantize(q: Tensor, scales: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The float [N, K] weight a quantized one stands for (the reference; the kernels never build it)."""
    dtype = dtype or scales.dtype
    if q.dtype == torch.int8:
        return (q.float() * scales.float()[:, None]).to(dtype)
    if q.dtype == torch.uint8:
        n2, K = q.shape
        nib = torch.stack([(q & 15), (q >> 4)], dim=1).reshape(2 * n2, K).float() - 8.0
        s = scales.float().t().repeat_interleave(INT4_GROUP, dim=1)[:, :K]  # [N, K]
        return (nib * s).to(dtype)
    raise TypeError(f"not a quantized weight: {q.dtype}")


def stored_in_by_out(module: nn.Module) -> bool:
    """Whether ``module`` is a projection that stores its weight [in, out] and computes ``addmm(bias, x, weight)``:
    transformers' ``Conv1D`` (GPT-2). Its weight is already laid out as the sparse GEMV reads it (one contiguous row
    per input); the graph reads it through a transpose (``passes/rewrite_matmul_as_linear.py``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored int8 or int4 (module docstring), computing
    ``teal::quantized_linear``. ``weight`` keeps the name (and the plan's key) of the linear it replaces; it is a
    frozen ``Parameter`` so that ``get_parameter`` and Dynamo see it as the float weight was seen."""

    def __init__(self, q: Tensor, scales: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = logical_shape(q)

    @property
    def format(self) -> str:
        return weight_format(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str) -> "QuantizedLinear":
        """From an ``nn.Linear``, or a module storing its weight [in, out] (``stored_in_by_out``: GPT-2's Conv1D)."""
        if fmt not in FORMATS:
            raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
        weight = linear.weight.t() if stored_in_by_out(linear) else linear.weight
        q, scales = (quantize_int8 if fmt == "int8" else quantize_int4)(weight)
        return cls(q, scales, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.teal.quantized_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def quantize_linears_(model: nn.Module, keys: list[str], fmt: str) -> int:
    """Replace the ``nn.Linear`` owning each weight key by a ``QuantizedLinear``, in place and one matrix at a time
    (the float weight is dropped before the next is quantized). Linears already in ``fmt`` are left; another format
    is an error. Returns how many were quantized."""
    done = 0
    for key in keys:
        path, _, leaf = key.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"{key!r} is not a linear's weight")
        module = model.get_submodule(path)
        if isinstance(module, QuantizedLinear):
            if module.format != fmt:
                raise ValueError(f"{path} is already quantized to {module.format}, not {fmt}")
            continue
        if not (isinstance(module, nn.Linear) or stored_in_by_out(module)):
            raise ValueError(f"{path} is a {type(module).__name__}, not an nn.Linear: cannot quantize it")
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, QuantizedLinear.from_linear(module, fmt))
        module.weight = None  # free the float weight now, even if the caller still holds the old module
        done += 1
    return done


def model_weight_format(model: nn.Module, keys: list[str]) -> Optional[str]:
    """The format the weights of ``keys`` have in ``model`` (None: float); an error if they are mixed."""
    formats = {weight_format(model.get_parameter(k)) for k in keys}
    if len(formats) > 1:
        raise ValueError(f"the model's block linears mix weight formats: {sorted(map(str, formats))}")
    return formats.pop() if formats else None
