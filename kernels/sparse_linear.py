"""The ``teal::sparse_linear`` custom op: y = (x ⊙ 1[|x| > t]) Wᵀ + b.

This is the single op the rewrite pass inserts for every matched block linear. Its semantics:

* A *decode* step (one token per sequence: ``x.shape[-2] == 1``, or a 2-D ``x`` of rows) is always
  sparsified.
* A *prefill* step (``x.shape[-2] = S > 1``) sparsifies only the positions ``>= ceil(prefill_sparse_from * S)``:
  ``1.0`` (the default) keeps prefill dense, ``0.0`` sparsifies every token (what decoding sees; used for
  perplexity), ``0.5`` is TEAL's evaluation protocol (the later half of each window).

The decision is taken at run time from the shape, so one graph serves any sequence length. On CUDA, a
decode step with at most ``MAX_GEMV_ROWS`` rows goes to the Triton sparse GEMV (``teal_fx.kernels.sparse_gemv``)
when it is available; everything else (CPU, prefill, large batches) runs the reference below.

Why ``torch.library.custom_op`` and not ``triton_op``: the kernel keeps state between launches, a workspace and arrival
counters that every launch leaves zero (no memset launch). A ``triton_op`` body is traced and functionalized, so those
buffers would have to become graph inputs marked mutated, which functionalization turns into clones or copy-backs
around each call: the launches the workspace exists to avoid. The ops therefore stay opaque to Inductor (registered
fakes, ``opcheck`` in the tests); in CUDA graphs, where the decode step runs, the Python launch path is not replayed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sparse_linear", "sparse_linear_group", "sparse_swiglu", "sparse_linear_add_rmsnorm", "reference_sparse_linear",
           "reference_rmsnorm", "sparsify"]


def keep_mask(x: Tensor, threshold: float) -> Tensor:
    """1[|x| > t], compared in float32 whatever the dtype of x (the kernels compare the same way)."""
    return x.abs().float() > threshold


def sparsify(x: Tensor, threshold: float) -> Tensor:
    """Zero the entries of ``x`` whose magnitude is at most ``threshold`` (TEAL's magnitude mask)."""
    return torch.where(keep_mask(x, threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sparse_token_mask_start(x: Tensor, prefill_sparse_from: float) -> int:
    """Index along the token axis from which tokens are sparsified (0 = all, S = none)."""
    if x.dim() < 3 or x.shape[-2] == 1:
        return 0
    seq = x.shape[-2]
    return min(seq, max(0, math.ceil(prefill_sparse_from * seq)))


def reference_sparse_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0
) -> Tensor:
    """Plain PyTorch implementation of the op (any device); the ground truth the kernels are tested against."""
    start = _sparse_token_mask_start(x, prefill_sparse_from)
    seq = x.shape[-2] if x.dim() >= 3 else 1
    if start >= seq and x.dim() >= 3:
        return F.linear(x, weight, bias)
    if start == 0:
        return F.linear(sparsify(x, threshold), weight, bias)
    x = torch.cat([x[..., :start, :], sparsify(x[..., start:, :], threshold)], dim=-2)
    return F.linear(x, weight, bias)


@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0,
    sparsity: float = -1.0,
) -> Tensor:
    """y = (x ⊙ 1[|x| > threshold]) weightᵀ + bias, with the decode/prefill rule of the module docstring.

    ``sparsity``: the fraction of inputs the threshold is expected to drop (from the plan; -1: unknown). It only
    picks the GPU kernel's variant, never the result."""
    if x.is_cuda and _sparse_token_mask_start(x, prefill_sparse_from) == 0:
        from teal_fx.kernels import sparse_gemv

        if sparse_gemv.supports(x, weight):
            return sparse_gemv.sparse_gemv(x, weight, bias, threshold, sparsity=sparsity)
    return reference_sparse_linear(x, weight, bias, threshold, prefill_sparse_from)


@sparse_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0,
      sparsity: float = -1.0) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_linear: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, threshold, prefill_sparse_from, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.threshold = threshold
    ctx.prefill_sparse_from = prefill_sparse_from
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    """Straight-through the mask: gradients flow only to the kept inputs (the mask itself is not learned)."""
    x, weight = ctx.saved_tensors
    start = _sparse_token_mask_start(x, ctx.prefill_sparse_from)
    keep = keep_mask(x, ctx.threshold)
    if x.dim() >= 3 and start > 0:
        keep[..., :start, :] = True
    x_used = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    grad_x = torch.where(keep, grad_out @ weight, torch.zeros((), dtype=x.dtype, device=x.device))
    grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x_used.reshape(-1, x.shape[-1])
    grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("teal::sparse_linear_group", mutates_args=())
def sparse_linear_group(
    x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
    prefill_sparse_from: float, sparsities: list[float],
) -> list[Tensor]:
    """``sparse_linear`` for linears sharing the input ``x`` (q/k/v, gate/up): one Triton launch on the decode path.

    Same semantics as calling ``sparse_linear(x, weights[i], biases[i], thresholds[i], prefill_sparse_from,
    sparsities[i])`` for each i (that is its reference and its CPU path). (No defaults here: the dispatcher drops
    default-valued arguments, and the tensor-list autograd wrapper then expects one gradient fewer.)
    """
    if x.is_cuda and _sparse_token_mask_start(x, prefill_sparse_from) == 0:
        from teal_fx.kernels import sparse_gemv

        if all(sparse_gemv.supports(x, w) for w in weights) and len({b is None for b in biases}) == 1:
            return sparse_gemv.sparse_gemv_group(x, weights, biases, thresholds, sparsity=min(sparsities, default=-1.0))
    return [reference_sparse_linear(x, w, b, t, prefill_sparse_from) for w, b, t in zip(weights, biases, thresholds)]


@sparse_linear_group.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
      prefill_sparse_from: float, sparsities: list[float]) -> list[Tensor]:
    for w in weights:
        torch._check(x.shape[-1] == w.shape[1], lambda: "sparse_linear_group: x and a weight disagree on in_features")
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _group_setup_context(ctx, inputs, output) -> None:
    x, weights, biases, thresholds, prefill_sparse_from, _ = inputs
    ctx.save_for_backward(x, *weights)
    ctx.thresholds = list(thresholds)
    ctx.prefill_sparse_from = prefill_sparse_from
    ctx.has_bias = [b is not None for b in biases]


def _group_backward(ctx, grad_outs: list[Tensor]):
    """Each segment's straight-through gradient (as ``_backward``), summed into x."""
    x, *weights = ctx.saved_tensors
    start = _sparse_token_mask_start(x, ctx.prefill_sparse_from)
    grad_x = torch.zeros_like(x)
    grad_ws = []
    for w, t, g in zip(weights, ctx.thresholds, grad_outs):
        keep = keep_mask(x, t)
        if x.dim() >= 3 and start > 0:
            keep[..., :start, :] = True
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        grad_x = grad_x + torch.where(keep, g @ w, zero)
        g2 = g.reshape(-1, g.shape[-1])
        grad_ws.append(g2.t() @ torch.where(keep, x, zero).reshape(-1, x.shape[-1]))
    if any(ctx.has_bias):
        # `Tensor?[]` arguments take no gradient through torch.library's autograd: refuse rather than drop them
        raise RuntimeError("teal::sparse_linear_group: no gradient for biases; compile with "
                           "options={'group_shared_input': False} to train through biased q/k/v")
    return grad_x, grad_ws, None, None, None, None


sparse_linear_group.register_autograd(_group_backward, setup_context=_group_setup_context)


@torch.library.custom_op("teal::sparse_swiglu", mutates_args=())
def sparse_swiglu(
    x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float, prefill_sparse_from: float,
    sparsities: list[float],
) -> Tensor:
    """``silu(gate) * up`` of a gated MLP, gate and up being ``sparse_linear`` of ``x`` (no biases).

    Its reference and CPU path is that expression, rounded as eager rounds it; on the decode path with column-major
    weights it is one Triton launch whose epilogue forms the product, so no kernel runs between the MLP's launches.
    No autograd: the pass that inserts it leaves graphs that need gradients alone."""
    if x.is_cuda and _sparse_token_mask_start(x, prefill_sparse_from) == 0:
        from teal_fx.kernels import sparse_gemv

        if sparse_gemv.supports(x, w_gate) and sparse_gemv.supports(x, w_up) and \
                sparse_gemv.can_fuse_swiglu(x, w_gate, w_up):
            return sparse_gemv.sparse_gemv_swiglu(x, w_gate, w_up, t_gate, t_up, sparsity=min(sparsities, default=-1.0))
        gate, up = sparse_linear_group(x, [w_gate, w_up], [None, None], [t_gate, t_up], prefill_sparse_from, sparsities)
        return F.silu(gate) * up
    gate = reference_sparse_linear(x, w_gate, None, t_gate, prefill_sparse_from)
    return F.silu(gate) * reference_sparse_linear(x, w_up, None, t_up, prefill_sparse_from)


@sparse_swiglu.register_fake
def _(x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float, prefill_sparse_from: float,
      sparsities: list[float]) -> Tensor:
    torch._check(w_gate.shape == w_up.shape, lambda: "sparse_swiglu: gate and up weights differ in shape")
    torch._check(x.shape[-1] == w_gate.shape[1], lambda: "sparse_swiglu: x and the weights disagree on in_features")
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


def reference_rmsnorm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm as eager computes it (``LlamaRMSNorm.forward``): fp32 statistics, the normalised value rounded
    to h's dtype before the weight's product."""
    hf = h.to(torch.float32)
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@torch.library.custom_op("teal::sparse_linear_add_rmsnorm", mutates_args=())
def sparse_linear_add_rmsnorm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float, sparsity: float,
    residual: Tensor, norm_weight: Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """(h, RMSNorm(h)) with h = residual + ``sparse_linear(x, weight, bias, threshold, ...)``: a block's o or down
    projection, its residual add and the next RMSNorm (Llama's: ``reference_rmsnorm``).

    On the decode path the linear's finishing launch does the add and the norm (one program per row holds all the
    columns), so no Inductor reduction kernel runs between it and the next linear. Elsewhere (CPU, prefill) it is
    that expression, rounded as eager rounds it. No autograd: the pass that inserts it leaves graphs that need
    gradients alone."""
    if x.is_cuda and _sparse_token_mask_start(x, prefill_sparse_from) == 0:
        from teal_fx.kernels import sparse_gemv

        if sparse_gemv.supports(x, weight) and sparse_gemv.can_fuse_add_rmsnorm(x, weight, residual, norm_weight):
            return sparse_gemv.sparse_gemv_add_rmsnorm(x, weight, bias, threshold, residual, norm_weight, eps,
                                                       sparsity=sparsity)
    h = residual + sparse_linear(x, weight, bias, threshold, prefill_sparse_from, sparsity)  # kernel or reference
    return h, reference_rmsnorm(h, norm_weight, eps)


@sparse_linear_add_rmsnorm.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float, sparsity: float,
      residual: Tensor, norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_linear_add_rmsnorm: x and weight disagree on in_features")
    torch._check(residual.shape[-1] == weight.shape[0], lambda: "sparse_linear_add_rmsnorm: residual and weight differ")
    shape = torch.broadcast_shapes(residual.shape, (*x.shape[:-1], weight.shape[0]))
    dtype = torch.promote_types(residual.dtype, x.dtype)
    h = residual.new_empty(shape, dtype=dtype)
    return h, h.new_empty(shape, dtype=torch.promote_types(dtype, norm_weight.dtype))
