"""Recognise Llama's RMSNorm in a Dynamo or ATen graph (an analysis: it never changes the graph).

``LlamaRMSNorm`` (also Mistral's, Qwen2/3's, Phi-3's, and Qwen3's per-head q/k norms) as eager traces it:
``w * (h.float() * rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)``. Used by
``fuse_add_rmsnorm`` (the norm after a residual add) and ``fold_rope_into_qkv_finish`` (Qwen3's q/k norms).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from teal_fx.passes.analysis.dataflow import ADD_TARGETS, MUL_TARGETS, fake_value, is_call, only_user, other_operand

aten = torch.ops.aten
_POW = {operator.pow, torch.pow, aten.pow.Tensor_Scalar}
_MEAN = {torch.mean, aten.mean.dim}
_RSQRT = {torch.rsqrt, aten.rsqrt.default}


@dataclass
class RMSNormMatch:
    weight: fx.Node  # [width] in h's dtype
    eps: float
    out: fx.Node  # the norm's result
    chain: list[fx.Node]  # the norm's nodes from ``out`` back to h's float32 cast (erasable in this order)


def dtype_cast(n: fx.Node, src: fx.Node) -> Optional[torch.dtype]:
    """The dtype ``n`` casts ``src`` to (``src.to(dtype)``, ``src.float()``, ``aten._to_copy``), else None."""
    if n.op == "call_method" and n.target == "float" and n.args == (src,) and not n.kwargs:
        return torch.float32
    if n.op == "call_method" and n.target == "to" and n.args[:1] == (src,):
        rest = list(n.args[1:]) + [v for k, v in n.kwargs.items() if k == "dtype"]
        if len(rest) == 1 and isinstance(rest[0], torch.dtype) and set(n.kwargs) <= {"dtype"}:
            return rest[0]
    if n.op == "call_function" and n.target is aten._to_copy.default and n.args == (src,):
        if set(n.kwargs) == {"dtype"}:
            return n.kwargs["dtype"]
    return None


def _is_square(n: fx.Node, src: fx.Node) -> bool:
    if is_call(n, _POW, ("pow", "__pow__")):
        return n.args == (src, 2) and not n.kwargs
    return False


def _is_last_dim_mean(n: fx.Node, src: fx.Node, ndim: int) -> bool:
    if not is_call(n, _MEAN, ("mean",)) or not n.args or n.args[0] is not src:
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    return isinstance(dim, int) and dim % ndim == ndim - 1 and keep is True and set(n.kwargs) <= {"dim", "keepdim"}


def llama_rmsnorm_of(h: fx.Node) -> Optional[RMSNormMatch]:
    """The RMSNorm of ``h`` over its last dim when one of ``h``'s users starts Llama's exact chain and each link feeds
    only the next (h's float32 copy feeds the pow and the multiply by its rsqrt); else None. Other users of ``h``
    are allowed (a residual stream is read on)."""
    v = fake_value(h)
    if not isinstance(v, torch.Tensor):
        return None
    for hf in [u for u in h.users if dtype_cast(u, h) == torch.float32]:
        users = list(hf.users)
        sq = next((u for u in users if _is_square(u, hf)), None)
        mul1 = next((u for u in users if u is not sq), None)
        if len(users) != 2 or sq is None or not is_call(mul1, MUL_TARGETS, ("mul", "__mul__")):
            continue
        mean = only_user(sq)
        if mean is None or not _is_last_dim_mean(mean, sq, v.dim()):
            continue
        add_eps = only_user(mean)
        eps = other_operand(add_eps, mean) if add_eps is not None and is_call(add_eps, ADD_TARGETS, ("add", "__add__")) \
            else None
        if not isinstance(eps, float):
            continue
        rsqrt = only_user(add_eps)
        if rsqrt is None or not is_call(rsqrt, _RSQRT, ("rsqrt",)) or rsqrt.args != (add_eps,) or rsqrt.kwargs:
            continue
        if only_user(rsqrt) is not mul1 or other_operand(mul1, rsqrt) is not hf:
            continue
        back = only_user(mul1)
        if back is None or dtype_cast(back, mul1) != v.dtype:
            continue
        mul2 = only_user(back)
        if mul2 is None or not is_call(mul2, MUL_TARGETS, ("mul", "__mul__")):
            continue
        weight = other_operand(mul2, back)
        w = fake_value(weight) if isinstance(weight, fx.Node) else None
        if not isinstance(w, torch.Tensor) or w.shape != (v.shape[-1],) or w.dtype != v.dtype:
            continue
        return RMSNormMatch(weight, eps, mul2, [mul2, back, mul1, rsqrt, add_eps, mean, sq, hf])
    return None
