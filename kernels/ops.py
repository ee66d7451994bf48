"""The ``teal::*`` custom ops: their registration with ``torch.library``, fake (meta) functions and autograd.

Each op dispatches to its Triton launcher where the kernel takes the operands (CUDA, a decode step, supported
dtypes and row counts) and runs ``reference.py`` everywhere else, so one graph serves CPU, prefill and decode.

    teal::sparse_linear(x, W, b, t, prefill_sparse_from, sparsity)     y = (x ⊙ 1[|x| > t]) Wᵀ + b
    teal::sparse_linear_group(x, [W], [b], [t], ...)                    linears sharing x (q/k/v, gate/up)
    teal::sparse_swiglu(x, W_gate, W_up, t_gate, t_up, ...)             silu(gate) * up
    teal::sparse_linear_add_rmsnorm(x, W, b, t, ..., residual, w, eps)   (h = residual + y, RMSNorm(h))
    teal::sparse_mlp_add_rmsnorm(x, W_gate, W_up, W_down, ...)          the two above, down over silu(gate) * up
    teal::sparse_linear_qkv_rope(x, [Wq, Wk, Wv], ..., cos, sin, pos, k_cache, v_cache)   RoPE(q); cache <- RoPE(k), v
    teal::decode_attention(q, k, v, mask, scale)                        one query position, GQA heads read once
    teal::sparse_qkv_rope_attention(x, [Wq, Wk, Wv], ..., mask, scale)  the two above, q formed by the attention
    teal::sparse_attention_add_rmsnorm(x, [Wq, Wk, Wv], ..., W_o, ...)  it and o's add + RMSNorm, o merging the splits
    teal::quantized_linear(x, W_q, scales, b)                           x Wᵀ + b, W int8/int4 (kernels/quantize.py)

The sparse ops take int8/int4 weights too, with their ``scales`` (None: a float weight), ``shared``: one mask for
the batch (a plan's ``batch_mask="shared"``: ``reference.keep_mask``) instead of one per row, and ``x_int8`` (a plan's
``activations="int8"``, int8/int4 weights): the masked x of the sparsified tokens rounded to int8 per 32 inputs
(``reference.masked_input``), which the one-row GEMV multiplies with dp4a; elsewhere (batches, CPU) the ops round x
so and run their usual path.

A decode step (one token per sequence, or a 2-D ``x`` of rows) is always sparsified; a prefill of S tokens from
position ``ceil(prefill_sparse_from * S)`` on (``reference.sparse_token_start``), decided at run time from the shape.
``sparsity`` (the plan's expected fraction of dropped inputs, -1: unknown) only picks the kernel's variant, or cuBLAS
on the masked input where the kernel cannot win (per-row masks over several rows: ``sparse_gemv_config.kernel_pays``).

Why ``torch.library.custom_op`` and not ``triton_op``: the kernels keep state between launches, a workspace and
arrival counters that every launch leaves zero (no memset launch). A ``triton_op`` body is traced and functionalized,
so those buffers would become graph inputs marked mutated, which functionalization turns into clones or copy-backs
around each call: the launches the workspace exists to avoid. The ops therefore stay opaque to Inductor (registered
fakes, ``opcheck`` in the tests); in CUDA graphs, where the decode step runs, the Python launch path is not replayed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from teal_fx.kernels import decode_attention as attention_launcher
from teal_fx.kernels import dequant_matmul, sparse_gemv
from teal_fx.kernels.quantize import dequantize, logical_shape
from teal_fx.kernels.reference import (
    keep_mask,
    masked_input,
    reference_decode_attention,
    reference_qkv_rope_,
    reference_rmsnorm,
    reference_sparse_linear,
    reference_swiglu,
    sparse_token_start,
)

# The ops that take the inputs every layer shares (the mask; cos and sin) and whose launchers take any strides: they
# check the layouts their kernels need and copy or run the reference otherwise. For them Inductor passes its buffers
# as they are; without the tag it gives each call its own copy of an input that is not yet a buffer (torch 2.11 on
# the H100: cos, sin and the mask formed again for each of 32 layers, in small launches inside the decode step's
# chain of launches; docs/perf-log.md v62).
ANY_STRIDES = (torch.Tag.flexible_layout,)


def registered_ops() -> list[torch._ops.OpOverload]:
    """Every ``teal::`` op's default overload the dispatcher knows (those below and any a user adds to the namespace):
    what the backend gives Inductor's fallback lowering (``teal_fx.inductor.register_fallbacks``)."""
    names = (n.partition("::")[2] for n in torch._C._dispatch_get_all_op_names() if n.startswith("teal::"))
    return [getattr(torch.ops.teal, n).default for n in names if "." not in n]


def _not_decoded(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float,
                 scales: Optional[Tensor], shared: bool = False, x_int8: bool = False) -> Tensor:
    """A sparse linear off the GEMV's path (CPU, prefill, shapes it does not take): the reference, except that a
    quantized weight on a GPU goes through the dequantizing GEMM rather than a float copy of the matrix."""
    if scales is not None and dequant_matmul.supports(x, weight):
        return dequant_matmul.dequant_matmul(masked_input(x, threshold, prefill_sparse_from, shared, x_int8), weight,
                                             scales, bias)
    return reference_sparse_linear(x, weight, bias, threshold, prefill_sparse_from, scales, shared, x_int8)


def _on_int8_grid(x: Tensor, threshold: float, prefill_sparse_from: float, shared: bool) -> Tensor:
    """x_int8 off the one-row GEMV (batches on a GPU): x masked and rounded to its int8 grid, for the usual path with
    threshold 0 and per-row masks (the grid's zeros are the mask's)."""
    return masked_input(x, threshold, prefill_sparse_from, shared, True)


@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0,
    sparsity: float = -1.0, scales: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False,
) -> Tensor:
    """y = (x ⊙ 1[|x| > threshold]) weightᵀ + bias, with the decode/prefill rule of the module docstring.

    ``sparsity``: the fraction of inputs the threshold is expected to drop (from the plan; -1: unknown). It only
    picks the GPU kernel's variant, never the result. ``scales``: those of an int8/int4 ``weight``; ``x_int8``: see
    the module docstring."""
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        if x_int8 and not sparse_gemv.supports(x, weight, scales, shared, x_int8):
            return sparse_linear(_on_int8_grid(x, threshold, prefill_sparse_from, shared), weight, bias, 0.0,
                                 prefill_sparse_from, sparsity, scales)
        if sparse_gemv.supports(x, weight, scales, shared, x_int8) and \
                sparse_gemv.pays(x, weight.shape[0], sparsity, shared, scales is not None):
            return sparse_gemv.sparse_gemv(x, weight, bias, threshold, sparsity=sparsity, scales=scales, shared=shared,
                                           x_int8=x_int8)
    return _not_decoded(x, weight, bias, threshold, prefill_sparse_from, scales, shared, x_int8)


@sparse_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float = 1.0,
      sparsity: float = -1.0, scales: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_linear: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], logical_shape(weight)[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, threshold, prefill_sparse_from, _, scales, shared, _x_int8 = inputs
    ctx.shared = shared
    if scales is not None:  # a frozen quantized weight: the input's gradient only, through the dequantized matrix
        weight = dequantize(weight, scales, x.dtype)
    ctx.quantized = scales is not None
    ctx.save_for_backward(x, weight)
    ctx.threshold = threshold
    ctx.prefill_sparse_from = prefill_sparse_from
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    """Straight-through the mask: gradients flow only to the kept inputs (the mask itself is not learned), and
    through x_int8's rounding as if it were not there."""
    x, weight = ctx.saved_tensors
    start = sparse_token_start(x, ctx.prefill_sparse_from)
    keep = keep_mask(x, ctx.threshold, ctx.shared).clone()
    if x.dim() >= 3 and start > 0:
        keep[..., :start, :] = True
    x_used = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    grad_x = torch.where(keep, grad_out @ weight, torch.zeros((), dtype=x.dtype, device=x.device))
    grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x_used.reshape(-1, x.shape[-1])
    grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None if ctx.quantized else grad_w, grad_b, None, None, None, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


def _group_on_kernel(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                     scales: list[Optional[Tensor]], hint: float, shared: bool, x_int8: bool) -> bool:
    """Whether a grouped decode launch takes these linears sharing ``x``: every member on the kernel, all biased or
    none, and the kernel paying over their summed columns."""
    return all(sparse_gemv.supports(x, w, s, shared, x_int8) for w, s in zip(weights, scales)) and \
        len({b is None for b in biases}) == 1 and \
        sparse_gemv.pays(x, sum(w.shape[0] for w in weights), hint, shared, scales[0] is not None)


@torch.library.custom_op("teal::sparse_linear_group", mutates_args=())
def sparse_linear_group(
    x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
    prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool, x_int8: bool,
) -> list[Tensor]:
    """``sparse_linear`` for linears sharing the input ``x`` (q/k/v, gate/up): one Triton launch on the decode path.

    Same semantics as calling ``sparse_linear(x, weights[i], biases[i], thresholds[i], prefill_sparse_from,
    sparsities[i])`` for each i (that is its reference and its CPU path). (No defaults here: the dispatcher drops
    default-valued arguments, and the tensor-list autograd wrapper then expects one gradient fewer.)
    """
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        hint = min(sparsities, default=-1.0)
        if _group_on_kernel(x, weights, biases, scales, hint, shared, x_int8):
            return sparse_gemv.sparse_gemv_group(x, weights, biases, thresholds, sparsity=hint, scales=scales,
                                                 shared=shared, x_int8=x_int8)
        if x_int8:  # each member's threshold puts x on its own int8 grid
            return [sparse_linear(x, w, b, t, prefill_sparse_from, sp, s, shared, True)
                    for w, b, t, sp, s in zip(weights, biases, thresholds, sparsities, scales)]
    return [_not_decoded(x, w, b, t, prefill_sparse_from, s, shared, x_int8)
            for w, b, t, s in zip(weights, biases, thresholds, scales)]


@sparse_linear_group.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
      prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool,
      x_int8: bool) -> list[Tensor]:
    for w in weights:
        torch._check(x.shape[-1] == w.shape[1], lambda: "sparse_linear_group: x and a weight disagree on in_features")
    return [x.new_empty((*x.shape[:-1], logical_shape(w)[0])) for w in weights]


def _group_setup_context(ctx, inputs, output) -> None:
    x, weights, biases, thresholds, prefill_sparse_from, _, scales, shared, _x_int8 = inputs
    ctx.shared = shared
    ctx.quantized = [s is not None for s in scales]
    weights = [w if s is None else dequantize(w, s, x.dtype) for w, s in zip(weights, scales)]
    ctx.save_for_backward(x, *weights)
    ctx.thresholds = list(thresholds)
    ctx.prefill_sparse_from = prefill_sparse_from
    ctx.has_bias = [b is not None for b in biases]


def _group_backward(ctx, grad_outs: list[Tensor]):
    """Each segment's straight-through gradient (as ``_backward``), summed into x."""
    x, *weights = ctx.saved_tensors
    start = sparse_token_start(x, ctx.prefill_sparse_from)
    grad_x = torch.zeros_like(x)
    grad_ws = []
    for w, t, g, frozen in zip(weights, ctx.thresholds, grad_outs, ctx.quantized):
        keep = keep_mask(x, t, ctx.shared).clone()
        if x.dim() >= 3 and start > 0:
            keep[..., :start, :] = True
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        grad_x = grad_x + torch.where(keep, g @ w, zero)
        g2 = g.reshape(-1, g.shape[-1])
        grad_ws.append(None if frozen else g2.t() @ torch.where(keep, x, zero).reshape(-1, x.shape[-1]))
    if any(ctx.has_bias):
        # `Tensor?[]` arguments take no gradient through torch.library's autograd: refuse rather than drop them
        raise RuntimeError("teal::sparse_linear_group: no gradient for biases; compile with "
                           "options={'group_shared_input': False} to train through biased q/k/v")
    return grad_x, grad_ws, None, None, None, None, None, None, None


sparse_linear_group.register_autograd(_group_backward, setup_context=_group_setup_context)


@torch.library.custom_op("teal::sparse_swiglu", mutates_args=())
def sparse_swiglu(
    x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float, prefill_sparse_from: float,
    sparsities: list[float], scales_gate: Optional[Tensor] = None, scales_up: Optional[Tensor] = None,
    shared: bool = False, x_int8: bool = False,
) -> Tensor:
    """``silu(gate) * up`` of a gated MLP, gate and up being ``sparse_linear`` of ``x`` (no biases).

    Its reference and CPU path is that expression, rounded as eager rounds it; on the decode path with column-major
    weights it is one Triton launch whose epilogue forms the product, so no kernel runs between the MLP's launches.
    No autograd: the pass that inserts it leaves graphs that need gradients alone."""
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        hint = min(sparsities, default=-1.0)
        if sparse_gemv.supports(x, w_gate, scales_gate, shared, x_int8) \
                and sparse_gemv.supports(x, w_up, scales_up, shared, x_int8) \
                and sparse_gemv.can_fuse_swiglu(x, w_gate, w_up, shared) \
                and sparse_gemv.pays(x, w_gate.shape[0] + w_up.shape[0], hint, shared, scales_gate is not None):
            return sparse_gemv.sparse_gemv_swiglu(x, w_gate, w_up, t_gate, t_up, sparsity=hint,
                                                  scales_gate=scales_gate, scales_up=scales_up, shared=shared,
                                                  x_int8=x_int8)
        gate, up = sparse_linear_group(x, [w_gate, w_up], [None, None], [t_gate, t_up], prefill_sparse_from, sparsities,
                                       [scales_gate, scales_up], shared, x_int8)
        return F.silu(gate) * up
    if scales_gate is not None and dequant_matmul.supports(x, w_gate):
        gate = _not_decoded(x, w_gate, None, t_gate, prefill_sparse_from, scales_gate, shared, x_int8)
        return F.silu(gate) * _not_decoded(x, w_up, None, t_up, prefill_sparse_from, scales_up, shared, x_int8)
    return reference_swiglu(x, w_gate, w_up, t_gate, t_up, prefill_sparse_from, scales_gate, scales_up, shared, x_int8)


@sparse_swiglu.register_fake
def _(x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float, prefill_sparse_from: float,
      sparsities: list[float], scales_gate: Optional[Tensor] = None, scales_up: Optional[Tensor] = None,
      shared: bool = False, x_int8: bool = False) -> Tensor:
    torch._check(w_gate.shape == w_up.shape, lambda: "sparse_swiglu: gate and up weights differ in shape")
    torch._check(x.shape[-1] == w_gate.shape[1], lambda: "sparse_swiglu: x and the weights disagree on in_features")
    return x.new_empty((*x.shape[:-1], logical_shape(w_gate)[0]))


@torch.library.custom_op("teal::sparse_linear_add_rmsnorm", mutates_args=())
def sparse_linear_add_rmsnorm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float, sparsity: float,
    residual: Tensor, norm_weight: Tensor, eps: float, scales: Optional[Tensor] = None, shared: bool = False,
    x_int8: bool = False,
) -> tuple[Tensor, Tensor]:
    """(h, RMSNorm(h)) with h = residual + ``sparse_linear(x, weight, bias, threshold, ...)``: a block's o or down
    projection, its residual add and the next RMSNorm (Llama's: ``reference_rmsnorm``).

    On the decode path the linear's finishing launch does the add and the norm (one program per row holds all the
    columns), so no Inductor reduction kernel runs between it and the next linear. Elsewhere (CPU, prefill) it is
    that expression, rounded as eager rounds it. No autograd: the pass that inserts it leaves graphs that need
    gradients alone."""
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        if sparse_gemv.supports(x, weight, scales, shared, x_int8) and \
                sparse_gemv.can_fuse_add_rmsnorm(x, weight, residual, norm_weight) and \
                sparse_gemv.pays(x, weight.shape[0], sparsity, shared, scales is not None):
            return sparse_gemv.sparse_gemv_add_rmsnorm(x, weight, bias, threshold, residual, norm_weight, eps,
                                                       sparsity=sparsity, scales=scales, shared=shared, x_int8=x_int8)
    h = residual + sparse_linear(x, weight, bias, threshold, prefill_sparse_from, sparsity, scales, shared, x_int8)
    return h, reference_rmsnorm(h, norm_weight, eps)


@sparse_linear_add_rmsnorm.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, prefill_sparse_from: float, sparsity: float,
      residual: Tensor, norm_weight: Tensor, eps: float, scales: Optional[Tensor] = None,
      shared: bool = False, x_int8: bool = False) -> tuple[Tensor, Tensor]:
    N = logical_shape(weight)[0]
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_linear_add_rmsnorm: x and weight disagree on in_features")
    torch._check(residual.shape[-1] == N, lambda: "sparse_linear_add_rmsnorm: residual and weight differ")
    shape = torch.broadcast_shapes(residual.shape, (*x.shape[:-1], N))
    dtype = torch.promote_types(residual.dtype, x.dtype)
    h = residual.new_empty(shape, dtype=dtype)
    return h, h.new_empty(shape, dtype=torch.promote_types(dtype, norm_weight.dtype))


@torch.library.custom_op("teal::sparse_mlp_add_rmsnorm", mutates_args=())
def sparse_mlp_add_rmsnorm(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_down: Optional[Tensor], t_gate: float, t_up: float,
    t_down: float, prefill_sparse_from: float, sparsities: list[float], residual: Tensor, norm_weight: Tensor,
    eps: float, scales_gate: Optional[Tensor] = None, scales_up: Optional[Tensor] = None,
    scales_down: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False,
) -> tuple[Tensor, Tensor]:
    """``sparse_linear_add_rmsnorm(sparse_swiglu(x, ...), w_down, ...)``: a gated MLP (``sparsities`` gate, up, down)
    and the residual add + RMSNorm after it, returning (h, RMSNorm(h)).

    On the decode path the down launch forms its input silu(gate) * up from the gate/up launch's sums itself
    (``sparse_gemv_mlp_add_rmsnorm``), so the SwiGLU finishing launch between them goes away; elsewhere it is the two
    ops. No autograd: the pass that inserts it leaves graphs that need gradients alone."""
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        hint = min(sparsities[:2], default=-1.0)
        weights = ((w_gate, scales_gate), (w_up, scales_up), (w_down, scales_down))
        if all(sparse_gemv.supports(x, w, s, shared, x_int8) for w, s in weights) \
                and sparse_gemv.can_fold_swiglu(x, w_gate, w_up, w_down, residual, norm_weight, shared, x_int8) \
                and sparse_gemv.pays(x, 2 * w_gate.shape[0], hint, shared, scales_gate is not None) \
                and sparse_gemv.pays(x, w_down.shape[0], sparsities[2], shared, scales_down is not None,
                                     in_features=w_down.shape[1]):
            return sparse_gemv.sparse_gemv_mlp_add_rmsnorm(
                x, w_gate, w_up, w_down, t_gate, t_up, t_down, residual, norm_weight, eps, b_down=b_down,
                sparsities=(hint, sparsities[2]), scales=(scales_gate, scales_up, scales_down), shared=shared)
    act = sparse_swiglu(x, w_gate, w_up, t_gate, t_up, prefill_sparse_from, sparsities[:2], scales_gate, scales_up,
                        shared, x_int8)
    return sparse_linear_add_rmsnorm(act, w_down, b_down, t_down, prefill_sparse_from, sparsities[2], residual,
                                     norm_weight, eps, scales_down, shared, x_int8)


@sparse_mlp_add_rmsnorm.register_fake
def _(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_down: Optional[Tensor], t_gate: float, t_up: float,
      t_down: float, prefill_sparse_from: float, sparsities: list[float], residual: Tensor, norm_weight: Tensor,
      eps: float, scales_gate: Optional[Tensor] = None, scales_up: Optional[Tensor] = None,
      scales_down: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False) -> tuple[Tensor, Tensor]:
    torch._check(w_gate.shape == w_up.shape, lambda: "sparse_mlp_add_rmsnorm: gate and up weights differ in shape")
    torch._check(x.shape[-1] == w_gate.shape[1], lambda: "sparse_mlp_add_rmsnorm: x and gate disagree on in_features")
    torch._check(w_down.shape[1] == logical_shape(w_gate)[0],
                 lambda: "sparse_mlp_add_rmsnorm: down does not take gate's outputs")
    N = logical_shape(w_down)[0]
    torch._check(residual.shape[-1] == N, lambda: "sparse_mlp_add_rmsnorm: residual and down differ")
    shape = torch.broadcast_shapes(residual.shape, (*x.shape[:-1], N))
    dtype = torch.promote_types(residual.dtype, x.dtype)
    h = residual.new_empty(shape, dtype=dtype)
    return h, h.new_empty(shape, dtype=torch.promote_types(dtype, norm_weight.dtype))


@torch.library.custom_op("teal::sparse_linear_qkv_rope", mutates_args=("k_cache", "v_cache"), tags=ANY_STRIDES)
def sparse_linear_qkv_rope(
    x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
    prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool, x_int8: bool,
    head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor, v_cache: Tensor,
    q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float,
) -> Tensor:
    """A grouped q/k/v ``sparse_linear_group`` followed by what a Llama-style attention does next: heads of
    ``head_dim`` (with ``q_norm`` / ``k_norm``: Qwen3's per-head RMSNorm, weights [D], ``norm_eps``), RoPE on q and k
    (``q * cos + rotate_half(q) * sin``), k and v written into the static cache at ``cache_position`` (in place).
    Returns the rotated q [B, Hq, S, D], contiguous (``reference_qkv_rope_``).

    On the decode path the grouped launch's finishing launch does the rotation and the cache writes, so neither
    Inductor's RoPE kernel nor the two ``index_copy_`` run between it and the attention; elsewhere it is the group
    op followed by the reference. No autograd: the pass that inserts it only rewrites decode graphs."""
    if x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0:
        hint = min(sparsities, default=-1.0)
        if _group_on_kernel(x, weights, biases, scales, hint, shared, x_int8) and \
                sparse_gemv.can_fold_rope(x, weights, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm,
                                          k_norm):
            return sparse_gemv.sparse_gemv_qkv_rope(x, weights, biases, thresholds, head_dim, cos, sin, cache_position,
                                                    k_cache, v_cache, q_norm, k_norm, norm_eps, sparsity=hint,
                                                    scales=scales, shared=shared, x_int8=x_int8)
    q, k, v = sparse_linear_group(x, weights, biases, thresholds, prefill_sparse_from, sparsities, scales, shared,
                                  x_int8)
    return reference_qkv_rope_(q, k, v, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, norm_eps)


@sparse_linear_qkv_rope.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
      prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool,
      x_int8: bool, head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor,
      v_cache: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float) -> Tensor:
    torch._check(len(weights) == 3, lambda: "sparse_linear_qkv_rope: three weights (q, k, v)")
    torch._check(x.dim() == 3, lambda: "sparse_linear_qkv_rope: x is [B, S, K]")
    return x.new_empty((x.shape[0], logical_shape(weights[0])[0] // head_dim, x.shape[1], head_dim))


@torch.library.custom_op("teal::quantized_linear", mutates_args=())
def quantized_linear(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x Wᵀ + b for an int8/int4 ``weight`` (``QuantizedLinear``'s forward; kernels/quantize.py): the dense op the
    rewrite turns into ``sparse_linear(..., scales)`` where the plan sparsifies it. On a GPU: the GEMV (threshold 0:
    every nonzero input read) for up to 8 rows, the dequantizing GEMM above; elsewhere the reference."""
    if x.is_cuda and sparse_gemv.supports(x, weight, scales):
        return sparse_gemv.sparse_gemv(x, weight, bias, 0.0, sparsity=0.0, scales=scales)
    return _not_decoded(x, weight, bias, 0.0, 1.0, scales)


@quantized_linear.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quantized_linear: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], logical_shape(weight)[0]))


@torch.library.custom_op("teal::decode_attention", mutates_args=(), tags=ANY_STRIDES)
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """softmax(q Kᵀ · scale + mask) V for one query position, K/V with ``H / Hkv`` query heads per KV head.

    q [B, H, 1, D], k/v [B, Hkv, L, D], mask (bool: attend where true; float: added) broadcastable to [B, H, 1, L].
    The same result as ``scaled_dot_product_attention`` on K/V repeated to H heads (the reference, and the path
    on CPU and for shapes the kernel does not take)."""
    if attention_launcher.supports(q, k, v, mask):
        return attention_launcher.decode_attention_gpu(q, k, v, mask, scale)
    return reference_decode_attention(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "decode_attention: 4-D q, k, v")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "decode_attention: query heads must be a multiple of kv heads")
    return q.new_empty(q.shape)


def _attention_from_sums(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], prefill_sparse_from: float,
                         sparsities: list[float], scales: list[Optional[Tensor]], shared: bool, x_int8: bool,
                         head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor,
                         v_cache: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor],
                         mask: Optional[Tensor]) -> bool:
    """Whether a decode step's q/k/v launch leaves its sums for the attention launch to form q and the new k/v row
    from (``decode_attention_from_qkv_sums``): a decode step on the GPU, the q/k/v group on the kernel, heads the
    RoPE fold and the attention take. Both attention ops decide so."""
    if not (x.is_cuda and sparse_token_start(x, prefill_sparse_from) == 0):
        return False
    hq = logical_shape(weights[0])[0] // head_dim if head_dim else 0
    return _group_on_kernel(x, weights, biases, scales, min(sparsities, default=-1.0), shared, x_int8) and \
        sparse_gemv.can_fold_rope(x, weights, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm) \
        and attention_launcher.can_fold_qkv(head_dim, k_cache, mask) and hq % k_cache.shape[1] == 0


@torch.library.custom_op("teal::sparse_qkv_rope_attention", mutates_args=("k_cache", "v_cache"), tags=ANY_STRIDES)
def sparse_qkv_rope_attention(
    x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
    prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool, x_int8: bool,
    head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor, v_cache: Tensor,
    q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float, mask: Optional[Tensor], scale: float,
) -> Tensor:
    """``decode_attention(sparse_linear_qkv_rope(x, ...), k_cache, v_cache, mask, scale)``: a decode step's q/k/v
    projections, RoPE, the cache writes and the attention, returning the attention's [B, H, 1, D].

    On the decode path the attention launch forms q and the new k/v row from the q/k/v launch's sums itself
    (``decode_attention_from_qkv_sums``), so the q/k/v + RoPE finishing launch between them goes away; elsewhere it
    is the two ops. No autograd: the pass that inserts it only rewrites decode graphs."""
    if _attention_from_sums(x, weights, biases, prefill_sparse_from, sparsities, scales, shared, x_int8, head_dim,
                            cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, mask):
        sums = sparse_gemv.sparse_gemv_sums(x, weights, thresholds, sparsity=min(sparsities, default=-1.0),
                                            scales=scales, shared=shared, x_int8=x_int8)
        return attention_launcher.decode_attention_from_qkv_sums(
            sums, biases, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, norm_eps, mask, scale)
    q = sparse_linear_qkv_rope(x, weights, biases, thresholds, prefill_sparse_from, sparsities, scales, shared, x_int8,
                               head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, norm_eps)
    return decode_attention(q, k_cache, v_cache, mask, scale)


@sparse_qkv_rope_attention.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
      prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool,
      x_int8: bool, head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor,
      v_cache: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float, mask: Optional[Tensor],
      scale: float) -> Tensor:
    torch._check(len(weights) == 3, lambda: "sparse_qkv_rope_attention: three weights (q, k, v)")
    torch._check(x.dim() == 3, lambda: "sparse_qkv_rope_attention: x is [B, S, K]")
    heads = logical_shape(weights[0])[0] // head_dim
    torch._check(heads % k_cache.shape[1] == 0, lambda: "sparse_qkv_rope_attention: query heads must be a multiple "
                                                         "of the cache's kv heads")
    return x.new_empty((x.shape[0], heads, x.shape[1], head_dim))


@torch.library.custom_op("teal::sparse_attention_add_rmsnorm", mutates_args=("k_cache", "v_cache"), tags=ANY_STRIDES)
def sparse_attention_add_rmsnorm(
    x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
    prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool, x_int8: bool,
    head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor, v_cache: Tensor,
    q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float, mask: Optional[Tensor], scale: float,
    w_o: Tensor, b_o: Optional[Tensor], t_o: float, sparsity_o: float, scales_o: Optional[Tensor], residual: Tensor,
    norm_weight: Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """``sparse_linear_add_rmsnorm(o_input(sparse_qkv_rope_attention(x, ...)), w_o, ...)``, o_input the heads side by
    side ([B, H, S, D] -> [B, S, H·D]): a decode step's attention half, returning (h, RMSNorm(h)).

    On the decode path, where the cache is split among programs, the attention leaves its splits' softmax states
    unmerged and each o program merges its own K split of the attention's output (``sparse_gemv_merged_add_rmsnorm``):
    the merge's tail (a counter's round trip, the last program's reads) leaves the attention launch. Elsewhere it is
    the two ops. No autograd: the pass that inserts it only rewrites decode graphs."""
    B, hkv = x.shape[0], k_cache.shape[1]
    hq = logical_shape(weights[0])[0] // head_dim if head_dim else 0
    if _attention_from_sums(x, weights, biases, prefill_sparse_from, sparsities, scales, shared, x_int8, head_dim,
                            cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, mask) and \
            attention_launcher.cache_splits(B, hq, hkv, k_cache.shape[2], head_dim, x.device) > 1 and \
            sparse_gemv.supports(x, w_o, scales_o, shared, x_int8) and \
            sparse_gemv.can_fold_merge(B, hq, head_dim, w_o, residual, norm_weight, k_cache.dtype, x_int8) and \
            sparse_gemv.pays(x, w_o.shape[0], sparsity_o, shared, scales_o is not None, in_features=hq * head_dim):
        sums = sparse_gemv.sparse_gemv_sums(x, weights, thresholds, sparsity=min(sparsities, default=-1.0),
                                            scales=scales, shared=shared)
        states = attention_launcher.split_states_from_qkv_sums(
            sums, biases, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, norm_eps, mask, scale)
        return sparse_gemv.sparse_gemv_merged_add_rmsnorm(states, w_o, b_o, t_o, residual, norm_weight, eps, sums,
                                                          sparsity=sparsity_o, scales=scales_o, shared=shared)
    attn = sparse_qkv_rope_attention(x, weights, biases, thresholds, prefill_sparse_from, sparsities, scales, shared,
                                     x_int8, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm,
                                     norm_eps, mask, scale)
    return sparse_linear_add_rmsnorm(o_input(attn), w_o, b_o, t_o, prefill_sparse_from, sparsity_o, residual,
                                     norm_weight, eps, scales_o, shared, x_int8)


def o_input(attn: Tensor) -> Tensor:
    """o's input from the attention's output: [B, H, S, D] -> [B, S, H·D], the heads side by side (what
    ``fold_attention_merge_into_o`` checks the graph's own views compute)."""
    B, H, S, D = attn.shape
    return attn.transpose(1, 2).reshape(B, S, H * D)


@sparse_attention_add_rmsnorm.register_fake
def _(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
      prefill_sparse_from: float, sparsities: list[float], scales: list[Optional[Tensor]], shared: bool,
      x_int8: bool, head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor,
      v_cache: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float, mask: Optional[Tensor],
      scale: float, w_o: Tensor, b_o: Optional[Tensor], t_o: float, sparsity_o: float, scales_o: Optional[Tensor],
      residual: Tensor, norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    torch._check(len(weights) == 3, lambda: "sparse_attention_add_rmsnorm: three weights (q, k, v)")
    torch._check(x.dim() == 3, lambda: "sparse_attention_add_rmsnorm: x is [B, S, K]")
    heads = logical_shape(weights[0])[0] // head_dim
    torch._check(heads % k_cache.shape[1] == 0, lambda: "sparse_attention_add_rmsnorm: query heads must be a "
                                                         "multiple of the cache's kv heads")
    torch._check(w_o.shape[1] == heads * head_dim, lambda: "sparse_attention_add_rmsnorm: o does not take the heads")
    N = logical_shape(w_o)[0]
    torch._check(residual.shape[-1] == N, lambda: "sparse_attention_add_rmsnorm: residual and o differ")
    shape = torch.broadcast_shapes(residual.shape, (x.shape[0], x.shape[1], N))
    dtype = torch.promote_types(residual.dtype, x.dtype)  # o's input is the attention's output, in x's dtype
    h = residual.new_empty(shape, dtype=dtype)
    return h, h.new_empty(shape, dtype=torch.promote_types(dtype, norm_weight.dtype))
