"""The one reference implementation of every teal op, in plain PyTorch (any device, any dtype).

The ops run it on CPU, for prefill and for shapes the kernels do not take; the tests hold the kernels to it (in
float64, by passing float64 operands). Rounding follows eager PyTorch, so a fused kernel can be compared with the
unfused graph it replaced.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from teal_fx.kernels.quantize import ACT_TILE, dequantize


def keep_mask(x: Tensor, threshold: Union[float, Tensor], shared: bool = False) -> Tensor:
    """1[|x| > t], compared in float32 whatever the dtype of x (the kernels compare the same way); t a number, or a
    0-d tensor chosen in the graph (``sparsify_shared_by_batch``).

    ``shared`` (a plan's ``batch_mask="shared"``, paper §5.4.4): one mask for the whole batch, 1[mean_b |x_b| > t]
    over the batch's rows (dim 0), broadcast to every row; per token position for a [B, S, K] input."""
    a = x.abs().float()
    if shared and x.dim() >= 2:
        return (a.mean(dim=0, keepdim=True) > threshold).expand_as(a)
    return a > threshold


def sparsify(x: Tensor, threshold: Union[float, Tensor], shared: bool = False) -> Tensor:
    """Zero the entries of ``x`` whose magnitude is at most ``threshold`` (TEAL's magnitude mask; ``keep_mask``)."""
    return torch.where(keep_mask(x, threshold, shared), x, torch.zeros((), dtype=x.dtype, device=x.device))


def sparsify_shared_by_batch(x: Tensor, batch_thresholds: tuple[tuple[int, float], ...], one_row: float) -> Tensor:
    """``sparsify(x, t, shared=True)`` with t chosen at run time from the rows of ``x`` as
    ``LinearPlan.threshold_for`` chooses it (the calibrated batch size nearest in log scale; ``one_row`` for one row),
    in tensor ops only: a graph whose batch is symbolic (Hugging Face generate()'s default ``dynamic=None``) keeps the
    batch's threshold without a guard on the batch size."""
    rows = x.shape[0] if x.dim() >= 2 else 1
    b = torch.scalar_tensor(rows, dtype=torch.float64, device=x.device)
    sizes = torch.tensor([float(n) for n, _ in batch_thresholds], dtype=torch.float64, device=x.device)
    table = torch.tensor([t for _, t in batch_thresholds], dtype=torch.float32, device=x.device)
    # the log-scale distance as threshold_for computes it, max / min in fp64 (the same correctly rounded division,
    # so the same ties); argmin takes the first of equal distances, as min() does; index_select, not table[i]: an
    # index tensor would make Dynamo read its value
    nearest = table.index_select(0, (torch.maximum(sizes, b) / torch.minimum(sizes, b)).argmin().view(1))[0]
    threshold = torch.where(b <= 1, torch.scalar_tensor(one_row, dtype=torch.float32, device=x.device), nearest)
    return sparsify(x, threshold, shared=True)


def sparse_token_start(x: Tensor, prefill_sparse_from: float) -> int:
    """Index along the token axis from which tokens are sparsified (0 = all, S = none).

    A decode step (one token per sequence, or a 2-D ``x`` of rows) is always sparsified; a prefill of S tokens from
    ``ceil(prefill_sparse_from * S)`` on (1.0: dense, 0.0: every token, 0.5: TEAL's later half)."""
    if x.dim() < 3 or x.shape[-2] == 1:
        return 0
    seq = x.shape[-2]
    return min(seq, max(0, math.ceil(prefill_sparse_from * seq)))


def reference_sparse_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0,
    scales: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False,
) -> Tensor:
    """y = (x ⊙ 1[|x| > t]) Wᵀ + b, with the decode/prefill rule of ``sparse_token_start``; an int8/int4 weight
    (with ``scales``) is dequantized to x's dtype first; ``x_int8``: the sparsified tokens' x then rounded to int8
    per ``ACT_TILE`` inputs (``masked_input``)."""
    if scales is not None:
        weight = dequantize(weight, scales, x.dtype)
    return F.linear(masked_input(x, threshold, prefill_sparse_from, shared, x_int8), weight, bias)


def masked_input(x: Tensor, threshold: float, prefill_sparse_from: float = 1.0, shared: bool = False,
                 x_int8: bool = False) -> Tensor:
    """x with the rule of ``sparse_token_start`` applied: the input every sparse linear multiplies by Wᵀ. ``x_int8``
    (a plan's ``activations="int8"``): each sparsified token's masked x then stands for its int8 values times their
    tile scales (``quantize_activation_tiles``, computed in fp32, rounded to x's dtype): what the int8-x GEMV
    multiplies; the dense tokens of a prefill stay as they are."""
    start = sparse_token_start(x, prefill_sparse_from)
    seq = x.shape[-2] if x.dim() >= 3 else 1
    if start >= seq and x.dim() >= 3:
        return x

    def masked(part: Tensor) -> Tensor:
        part = sparsify(part, threshold, shared)
        return int8_grid(part) if x_int8 else part

    if start == 0:
        return masked(x)
    return torch.cat([x[..., :start, :], masked(x[..., start:, :])], dim=-2)


def int8_grid(x: Tensor) -> Tensor:
    """x replaced by q * scale of ``quantize_activation_tiles`` (fp32 product, then x's dtype)."""
    q, scales = quantize_activation_tiles(x)
    per_input = scales.repeat_interleave(ACT_TILE, dim=-1)[..., :x.shape[-1]]
    return (q.to(torch.float64 if x.dtype == torch.float64 else torch.float32) * per_input).to(x.dtype)


def quantize_activation_tiles(x: Tensor, tile: int = ACT_TILE) -> tuple[Tensor, Tensor]:
    """W8A8's x: (q, scales), q int8 [..., K] with x ≈ q * scales per ``tile`` inputs along K (the last tile may be
    short), scales [..., ceil(K / tile)] fp32 = max|x| / 127 of each tile (0 for an all-zero tile), q rounded to
    nearest in fp32 as the kernel's ``quantize_x_tiles`` rounds."""
    K = x.shape[-1]
    T = -(-K // tile)
    xf = F.pad(x.float(), (0, T * tile - K)).reshape(*x.shape[:-1], T, tile)
    amax = xf.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    q = torch.round(xf * inv[..., None]).reshape(*x.shape[:-1], T * tile)[..., :K]
    return q.to(torch.int8), amax / 127.0


def reference_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float,
                     prefill_sparse_from: float = 1.0, scales_gate: Optional[Tensor] = None,
                     scales_up: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False) -> Tensor:
    """silu(gate) * up with gate and up sparse linears of ``x`` (no biases), rounded as eager rounds."""
    gate = reference_sparse_linear(x, w_gate, None, t_gate, prefill_sparse_from, scales_gate, shared, x_int8)
    return F.silu(gate) * reference_sparse_linear(x, w_up, None, t_up, prefill_sparse_from, scales_up, shared, x_int8)


def reference_rmsnorm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm as eager computes it (``LlamaRMSNorm.forward``): fp32 statistics, the normalised value rounded
    to h's dtype before the weight's product."""
    hf = h.to(torch.float32)
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim (transformers' ``rotate_half``, the RoPE of Llama and its kin)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_qkv_rope_(q: Tensor, k: Tensor, v: Tensor, head_dim: int, cos: Tensor, sin: Tensor,
                        cache_position: Tensor, k_cache: Tensor, v_cache: Tensor, q_norm: Optional[Tensor] = None,
                        k_norm: Optional[Tensor] = None, norm_eps: float = 0.0) -> Tensor:
    """What the graph does after a grouped q/k/v projection, as eager does it: split [B, S, H * D] into heads
    (``q_norm`` / ``k_norm``: Qwen3's RMSNorm of each head, weights [D]), move them to [B, H, S, D], rotate q and k
    (``q * cos + rotate_half(q) * sin``, cos/sin [B or 1, 1, S, D]), write k and v into the static cache at
    ``cache_position`` along dim 2 (in place), and return the rotated q (contiguous)."""
    B, S = q.shape[0], q.shape[1]

    def heads(t: Tensor, norm: Optional[Tensor] = None) -> Tensor:
        t = t.view(B, S, -1, head_dim)
        if norm is not None:
            t = reference_rmsnorm(t, norm, norm_eps)
        return t.transpose(1, 2)

    q, k, v = heads(q, q_norm), heads(k, k_norm), heads(v)
    q_embed = q * cos + rotate_half(q) * sin
    k_cache.index_copy_(2, cache_position, k * cos + rotate_half(k) * sin)
    v_cache.index_copy_(2, cache_position, v)
    return q_embed.contiguous()


def reference_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """softmax(q Kᵀ · scale + mask) V for one query position: sdpa over K/V repeated to the query heads."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
