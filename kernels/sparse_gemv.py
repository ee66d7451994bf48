"""Launchers of the sparse GEMV: y = (x ⊙ 1[|x| > t]) Wᵀ + b for 1 to 8 rows of x, W stored column-major.

    sparse_gemv(x, w, b, t)                       one linear
    sparse_gemv_group(x, [wq, wk, wv], ...)       up to three linears that share x (q/k/v, gate/up): one launch
    sparse_gemv_swiglu(x, w_gate, w_up, ...)      silu(gate) * up formed by the gate/up launch
    sparse_gemv_add_rmsnorm(x, w, b, t, r, nw, eps)   h = r + linear, RMSNorm(h), in the finishing launch
    sparse_gemv_mlp_add_rmsnorm(x, wg, wu, wd, ...)   the two above as one op, silu(gate) * up formed by down
    sparse_gemv_sums(x, [w], [t])                 the grouped launch's sums left for the next launch to read
    sparse_gemv_merged_add_rmsnorm(states, w, ...)    o over the attention's unmerged splits, merged by its launch

Every launcher takes ``scales`` for int8/int4 weights (kernels/quantize.py: the format follows the weight's dtype).
The kernels are in ``sparse_gemv_triton.py``, the launch config in ``sparse_gemv_config.py``, the reference in
``reference.py``, the tests in tests/test_sparse_gemv.py, the benchmark in examples/bench_kernels.py. Every row of
x keeps its own mask; a weight row is read once if some row needs it. The fp32 split-K sums meet in an order that
varies between launches (not bit-reproducible); under ``torch.use_deterministic_algorithms(True)`` the ops do not
launch it (``supports``). On Hopper and newer, launches use programmatic dependent launch (``pdl.py``).
"""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from teal_fx.kernels import pdl
from teal_fx.kernels.quantize import ACT_TILE, INT4_GROUP, logical_shape, weight_format
from teal_fx.kernels.sparse_gemv_config import GemvConfig, choose_config, gpu_name, kernel_pays
from teal_fx.kernels.triton_support import DTYPES, HAS_TRITON, inline_ptx, interpreter_upcasts, next_pow2
from teal_fx.kernels.workspace import Workspace

if HAS_TRITON:
    from teal_fx.kernels import sparse_gemv_triton as jit
if TYPE_CHECKING:
    from teal_fx.kernels.decode_attention import SplitStates

MAX_ROWS = 8
MAX_SHARED_ROWS = 16  # one mask for the batch (``shared``): the union cannot grow, so larger batches still gain
MAX_SEGMENTS = 3  # linears sharing one input in a grouped launch (q, k, v)
MAX_NORM_WIDTH = 16384  # the add + RMSNorm finish holds a row's N columns in one program
MAX_ROPE_HEAD_DIM = 256  # the q/k/v + RoPE finish holds one head's D columns of every row in a program
MAX_FOLD_ROWS = 4  # the folded MLP's rows: each down program holds its rows x its K split of x at once (the
# in-thread loops' 1-4 rows; 5-8 take tensor cores, 16 padded rows x 512 inputs a program)

# ``ws`` the fp32 split-K accumulator and ``cnt`` the arrival counters (zero between launches), ``idx``/``xv`` the
# packed indices and values of the surviving inputs (compacted loops, up to 16 rows of values; written before
# read). The teal backend reserves it at compile time (``reserve_workspace``), before any CUDA graph is captured.
_WORKSPACE = Workspace("teal sparse GEMV (reserve_workspace)",
                       dtypes={"ws": torch.float32, "cnt": torch.int32, "idx": torch.int32, "xv": torch.float32},
                       min_sizes={"ws": 1 << 20, "cnt": 1 << 14, "idx": 1 << 16, "xv": 1 << 16})


def reserve_workspace(device: torch.device, max_n: int, max_k: int) -> None:
    """Allocate the scratch for launches over weights of up to ``max_n`` outputs and ``max_k`` inputs (a grouped
    launch spans up to MAX_SEGMENTS of them, each padded to a tile) and up to 16 padded rows."""
    width = MAX_SEGMENTS * (max_n + 256)
    # SPLIT_K * CHUNK < 2 * (K + K_PER_SPLIT), and choose_config's K_PER_SPLIT <= 2048 (the shared packed loop's)
    packed = MAX_SEGMENTS * 2 * (max_k + 4096)
    _WORKSPACE.reserve(torch.device(device), ws=16 * width, cnt=width // 16 + 1, idx=packed, xv=16 * packed)


# ------------------------------------------------------------------------------------------------ what it takes
def local_tensor(weight: Tensor) -> Tensor:
    """The tensor the kernel reads: a tensor-parallel rank's local shard of a DTensor parameter, else the weight."""
    return getattr(weight, "_local_tensor", weight)


def needs_column_major(weight: Tensor) -> bool:
    """Whether ``to_column_major_`` would move this weight: a 2-D CUDA weight (or TP shard) not yet column-major."""
    w = local_tensor(weight)
    return w.is_cuda and w.dim() == 2 and w.stride() != (1, w.shape[0])


def to_column_major_(weight: Tensor) -> bool:
    """Store a CUDA weight [N, K] column-major, in place (one matrix at a time, no second copy kept); True if moved.

    The kernel skips one contiguous row of Wᵀ per zero input; prefill keeps using cuBLAS, which reads the
    transposed layout natively. CPU weights are left alone (the CPU path is the reference)."""
    if not needs_column_major(weight):
        return False
    with torch.no_grad():
        if local_tensor(weight) is weight:
            weight.data = weight.data.t().contiguous().t()
        else:  # a DTensor: its shard is what ``w.to_local()`` hands the op
            weight._local_tensor = weight._local_tensor.t().contiguous().t()
    return True


def supports(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, shared: bool = False,
             x_int8: bool = False) -> bool:
    """Whether the ops may launch the kernel for these operands (else they run their reference). ``x_int8`` (a plan's
    ``activations="int8"``): one row of x against int8/int4 weights only (``weight_math`` 3)."""
    rows = x.numel() // max(1, x.shape[-1])
    fmt = weight_format(weight)
    if x_int8 and (rows != 1 or fmt is None):
        return False
    return (
        HAS_TRITON
        and x.is_cuda
        and weight.is_cuda
        and x.dtype in DTYPES
        and (weight.dtype == x.dtype if fmt is None else scales is not None and scales.is_cuda)
        and weight.dim() == 2
        and 1 <= rows <= (MAX_SHARED_ROWS if shared else MAX_ROWS)
        and (not shared or x.dim() < 3 or x.shape[-2] == 1)  # the kernel's rows are the batch: one token each
        and not _deterministic_requested()
    )


def pays(x: Tensor, N: int, sparsity: Optional[float], shared: bool, quantized: bool = False,
         in_features: Optional[int] = None) -> bool:
    """Whether the ops should launch the kernel over ``N`` output columns (summed over a grouped launch) rather than
    cuBLAS on the masked input (``kernel_pays``, by this GPU's measured break-even). Quantized weights always take
    the kernel: their dense alternative is no cuBLAS call. ``in_features``: the launch's K where it is not x's
    (a down launch whose input is formed from x's MLP)."""
    rows = x.numel() // max(1, x.shape[-1])
    return quantized or kernel_pays(rows, sparsity, shared, gpu_name(x.device), N, in_features or x.shape[-1])


_warned_deterministic = False


def _deterministic_requested() -> bool:
    """``torch.use_deterministic_algorithms(True)``: the kernel's split-K sums meet through fp32 atomics in a varying
    order, so, as PyTorch's own ops with a deterministic alternative do, the ops then take theirs (the masked
    input through ``F.linear``: same result up to rounding, no decode speedup), and say so once."""
    global _warned_deterministic
    if not torch.are_deterministic_algorithms_enabled():
        return False
    if not _warned_deterministic:
        _warned_deterministic = True
        warnings.warn("teal: torch.use_deterministic_algorithms is on, so the sparse linears run their deterministic "
                      "reference (masked input, dense F.linear) instead of the Triton sparse GEMV, whose split-K sums "
                      "use fp32 atomics: results are reproducible, decoding is not faster", stacklevel=2)
    return True


def _groupable(w: Tensor) -> bool:
    """A weight a grouped launch takes: the kernel swaps stride_wk (and N) per segment inside a runtime ``if``, and
    Triton makes an argument equal to 1 a constant, which the other branch cannot redefine. Column-major
    (stride_wn == 1, never swapped) with N >= 16 and stride_wk != 1 (a [N, 1] weight can have stride (1, 1))."""
    return w.stride(0) == 1 and w.stride(1) != 1 and w.shape[0] >= 16


def can_fuse_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, shared: bool = False) -> bool:
    """Whether ``sparse_gemv_swiglu`` takes these (one grouped launch: column-major weights of one shape and dtype,
    the input's or one quantized format; the device is the caller's check, ``supports``)."""
    return (w_gate.shape == w_up.shape and w_gate.dim() == 2 and w_gate.shape[1] == x.shape[-1]
            and w_gate.dtype == w_up.dtype and (w_gate.dtype == x.dtype or weight_format(w_gate) is not None)
            and x.dtype in DTYPES
            and _groupable(w_gate) and _groupable(w_up)
            and 1 <= x.numel() // max(1, x.shape[-1]) <= (MAX_SHARED_ROWS if shared else MAX_ROWS))


def can_fuse_add_rmsnorm(x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor) -> bool:
    """Whether ``sparse_gemv_add_rmsnorm`` takes these: the residual has the linear's output shape, the norm weight
    is [N], both in the input's dtype, N at most ``MAX_NORM_WIDTH`` (the device is the caller's check, ``supports``)."""
    N = logical_shape(weight)[0]
    return (weight.dim() == 2 and N <= MAX_NORM_WIDTH and residual.shape == (*x.shape[:-1], N)
            and norm_weight.shape == (N,) and residual.dtype == norm_weight.dtype == x.dtype
            and residual.device == x.device == norm_weight.device)


def can_fold_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, residual: Tensor, norm_weight: Tensor,
                    shared: bool = False, x_int8: bool = False) -> bool:
    """Whether ``sparse_gemv_mlp_add_rmsnorm`` takes these: what ``sparse_gemv_swiglu`` and
    ``sparse_gemv_add_rmsnorm`` take, down reading gate's outputs, at most MAX_FOLD_ROWS rows of float x (x_int8
    quantizes x in its own prologue: not folded)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (not x_int8 and 1 <= rows <= MAX_FOLD_ROWS and can_fuse_swiglu(x, w_gate, w_up, shared)
            and w_down.dim() == 2 and w_down.shape[1] == logical_shape(w_gate)[0]
            and can_fuse_add_rmsnorm(x, w_down, residual, norm_weight))


def can_fold_merge(x_rows: int, heads: int, head_dim: int, weight: Tensor, residual: Tensor, norm_weight: Tensor,
                   dtype: torch.dtype, x_int8: bool = False) -> bool:
    """Whether ``sparse_gemv_merged_add_rmsnorm`` takes these: o over the ``heads`` x ``head_dim`` outputs of an
    attention in ``dtype``, 1 to MAX_FOLD_ROWS rows of float x (x_int8 quantizes x in its own prologue), and a
    residual and norm weight ``sparse_gemv_add_rmsnorm`` takes (see ``can_fuse_add_rmsnorm``)."""
    N = logical_shape(weight)[0]
    return (not x_int8 and 1 <= x_rows <= MAX_FOLD_ROWS and weight.dim() == 2 and weight.shape[1] == heads * head_dim
            and N <= MAX_NORM_WIDTH and residual.shape[-1] == N and residual.numel() == x_rows * N
            and norm_weight.shape == (N,) and residual.dtype == norm_weight.dtype == dtype
            and residual.device == weight.device == norm_weight.device)


def can_fold_rope(x: Tensor, weights: Sequence[Tensor], head_dim: int, cos: Tensor, sin: Tensor,
                  cache_position: Tensor, k_cache: Tensor, v_cache: Tensor, q_norm: Optional[Tensor] = None,
                  k_norm: Optional[Tensor] = None) -> bool:
    """Whether ``sparse_gemv_qkv_rope`` takes these: one token per row, three column-major weights of one format
    (q, k, v) with whole heads of a power-of-two ``head_dim``, cos/sin [B or 1, 1, 1, D] and [B, Hkv, L, D] caches in
    the input's dtype with unit stride along D, one cache position, q/k norm weights both [D] or both absent (the
    device is the caller's check, ``supports``)."""
    B = x.shape[0] if x.dim() >= 2 else 1
    if len(weights) != 3 or x.dim() != 3 or x.shape[1] != 1 or not 1 <= B <= MAX_ROWS:
        return False
    if not all(_groupable(w) for w in weights) or len({w.dtype for w in weights}) > 1:
        return False
    D = head_dim
    nq, nk, nv = (logical_shape(w)[0] for w in weights)
    if D < 2 or D & (D - 1) or D > MAX_ROPE_HEAD_DIM or nq % D or nk % D or nv != nk:
        return False
    if x.dtype not in DTYPES or (weights[0].dtype != x.dtype and weight_format(weights[0]) is None):
        return False
    for t in (cos, sin):
        if t.dim() != 4 or t.shape[0] not in (1, B) or t.shape[1:] != (1, 1, D) or t.stride(-1) != 1 \
                or t.dtype != x.dtype or t.device != x.device:
            return False
    for c in (k_cache, v_cache):
        if c.dim() != 4 or c.shape[0] != B or c.shape[1] != nk // D or c.shape[3] != D or c.stride(-1) != 1 \
                or c.dtype != x.dtype or c.device != x.device:
            return False
    if (q_norm is None) != (k_norm is None):
        return False
    for nw in (q_norm, k_norm) if q_norm is not None else ():
        if nw.shape != (D,) or nw.stride(0) != 1 or nw.dtype != x.dtype or nw.device != x.device:
            return False
    return cache_position.numel() == 1 and not cache_position.is_floating_point() \
        and cache_position.device == x.device


# ------------------------------------------------------------------------------------------------ launchers
def sparse_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, *,
                config: Optional[GemvConfig] = None, out: Optional[Tensor] = None,
                sparsity: Optional[float] = None, scales: Optional[Tensor] = None, shared: bool = False,
                x_int8: bool = False) -> Tensor:
    """y = (x ⊙ 1[|x| > t]) Wᵀ + b. x: [..., K] with at most 8 rows; weight: [N, K], ideally column-major (stride
    (1, N)), or int8/int4 with its ``scales``. ``sparsity`` (expected fraction of inputs dropped, or None) only
    picks the launch config. ``x_int8``: the masked x quantized to int8 per 32 inputs first, int32 products (one row,
    int8/int4 weights; ``reference.reference_w8a8_linear``): a different result, not a config."""
    return sparse_gemv_group(x, [weight], [bias], [threshold], config=config, outs=None if out is None else [out],
                             sparsity=sparsity, scales=[scales], shared=shared, x_int8=x_int8)[0]


def sparse_gemv_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      thresholds: Sequence[float], *, config: Optional[GemvConfig] = None,
                      outs: Optional[Sequence[Tensor]] = None, sparsity: Optional[float] = None,
                      scales: Optional[Sequence[Optional[Tensor]]] = None, shared: bool = False,
                      x_int8: bool = False) -> list[Tensor]:
    """One launch for up to three linears that share the input ``x`` (q/k/v, gate/up): y_i = (x ⊙ 1[|x| > t_i]) W_iᵀ + b_i.

    The segments' N tiles form one grid, so the small k/v projections ride along with q instead of paying a
    launch and a ramp each. A weight row of segment i is read when some row of x exceeds t_i at that input.
    """
    nseg = len(weights)
    if not 1 <= nseg <= MAX_SEGMENTS or len(biases) != nseg or len(thresholds) != nseg:
        raise ValueError(f"sparse_gemv_group takes 1 to {MAX_SEGMENTS} weights with as many biases and thresholds")
    if len({b is None for b in biases}) > 1:
        raise ValueError("sparse_gemv_group: either every segment has a bias or none has")
    scales = list(scales) if scales is not None else [None] * nseg
    if nseg > 1 and (not all(_groupable(w) for w in weights) or len({w.dtype for w in weights}) > 1):
        # the kernel swaps only stride_wk per segment, and no swapped scalar may be 1 (see the kernel); one weight
        # format per launch: launch apart
        return [sparse_gemv(x, w, b, t, config=config, out=o, sparsity=sparsity, scales=s, shared=shared,
                            x_int8=x_int8)
                for w, b, t, o, s in zip(weights, biases, thresholds, outs if outs is not None else [None] * nseg,
                                         scales)]
    return _launch(x, weights, biases, thresholds, config, outs, sparsity, _Epilogue.STORE, scales=scales,
                   shared=shared, x_int8=x_int8)


def sparse_gemv_sums(x: Tensor, weights: Sequence[Tensor], thresholds: Sequence[float], *,
                     config: Optional[GemvConfig] = None, sparsity: Optional[float] = None,
                     scales: Optional[Sequence[Optional[Tensor]]] = None, shared: bool = False,
                     x_int8: bool = False) -> list[Tensor]:
    """The grouped launch without its finish: each linear's fp32 sums (x ⊙ 1[|x| > t_i]) W_iᵀ, no bias, left in the
    workspace, returned as [rows, N_i] views of its rows. The next launch must read them (forming its own input from
    them) and a launch after it zero them before any other GEMV adds into the workspace: ``sparse_gemv_mlp_add_rmsnorm``
    and ``decode_attention.decode_attention_from_qkv_sums`` do. One launch a layer fewer than a finish."""
    if not 1 <= len(weights) <= MAX_SEGMENTS or (len(weights) > 1 and not all(_groupable(w) for w in weights)) \
            or len({w.dtype for w in weights}) > 1:
        raise ValueError(f"sparse_gemv_sums: 1 to {MAX_SEGMENTS} weights of one dtype, column-major if several")
    return _launch(x, weights, [None] * len(weights), thresholds, config, None, sparsity, _Epilogue.SUMS,
                   scales=scales, shared=shared, x_int8=x_int8)


def sparse_gemv_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, t_gate: float, t_up: float, *,
                       config: Optional[GemvConfig] = None, out: Optional[Tensor] = None,
                       sparsity: Optional[float] = None, scales_gate: Optional[Tensor] = None,
                       scales_up: Optional[Tensor] = None, shared: bool = False, x_int8: bool = False) -> Tensor:
    """silu(x_g W_gateᵀ) * (x_u W_upᵀ), x_g/x_u = x masked by t_gate/t_up, in one launch (see ``can_fuse_swiglu``).

    The gate/up group launch whose last program per column tile forms the product from the two fp32 sums, rounding
    after each op as eager ``F.silu(gate) * up`` does: the SiLU kernel between the MLP's launches goes away."""
    if not can_fuse_swiglu(x, w_gate, w_up, shared):
        raise ValueError("sparse_gemv_swiglu: needs column-major gate and up weights of one shape (see can_fuse_swiglu)")
    if out is None:
        out = torch.empty((x.reshape(-1, x.shape[-1]).shape[0], logical_shape(w_gate)[0]), dtype=x.dtype,
                          device=x.device)
    return _launch(x, [w_gate, w_up], [None, None], [t_gate, t_up], config, [out, out], sparsity, _Epilogue.SWIGLU,
                   scales=[scales_gate, scales_up], shared=shared, x_int8=x_int8)[0]


def sparse_gemv_add_rmsnorm(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, residual: Tensor,
                            norm_weight: Tensor, eps: float, *, config: Optional[GemvConfig] = None,
                            sparsity: Optional[float] = None, outs: Optional[tuple[Tensor, Tensor]] = None,
                            scales: Optional[Tensor] = None, shared: bool = False,
                            x_int8: bool = False) -> tuple[Tensor, Tensor]:
    """h = residual + (x ⊙ 1[|x| > t]) Wᵀ (+ b) and out = RMSNorm(h) · norm_weight (Llama's, eager rounding), in two
    launches: the GEMV grid, then one program per row that finishes the split-K sums, adds, normalises and writes
    both (see ``can_fuse_add_rmsnorm``). Returns (h, out), written into ``outs`` ([rows, N] each) if given."""
    if not can_fuse_add_rmsnorm(x, weight, residual, norm_weight):
        raise ValueError("sparse_gemv_add_rmsnorm: needs a residual of the output's shape and a [N] norm weight, in "
                         f"the input's dtype, N <= {MAX_NORM_WIDTH} (see can_fuse_add_rmsnorm)")
    h, norm = _add_rmsnorm_outputs(x, logical_shape(weight)[0], residual, norm_weight, eps, outs)
    _launch(x, [weight], [bias], [threshold], config, [h], sparsity, _Epilogue.ADD_RMSNORM, norm, scales=[scales],
            shared=shared, x_int8=x_int8)
    return h.reshape(residual.shape), norm.out.reshape(residual.shape)


def sparse_gemv_mlp_add_rmsnorm(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, t_gate: float, t_up: float,
                                t_down: float, residual: Tensor, norm_weight: Tensor, eps: float, *,
                                b_down: Optional[Tensor] = None, sparsities: Sequence[Optional[float]] = (None, None),
                                scales: Sequence[Optional[Tensor]] = (None, None, None), shared: bool = False,
                                configs: Sequence[Optional[GemvConfig]] = (None, None)) -> tuple[Tensor, Tensor]:
    """A gated MLP and the residual add + RMSNorm after it, h = residual + down(silu(gate(x)) * up(x)) (+ b_down) and
    out = RMSNorm(h) · norm_weight, in three launches where ``sparse_gemv_swiglu`` then ``sparse_gemv_add_rmsnorm``
    take four: the gate/up grid leaves its sums in the workspace; each down program forms its K split of
    x = silu(gate) * up from them (rounded as the SwiGLU finish rounds, the finish folded in); the down finish adds,
    normalises and zeroes the gate/up sums. Same result. ``sparsities``: (gate/up, down) hints; ``scales``: gate's,
    up's and down's (int8/int4); ``configs``: (gate/up, down) or the rule. Returns (h, out) in the residual's shape."""
    if not can_fold_swiglu(x, w_gate, w_up, w_down, residual, norm_weight, shared):
        raise ValueError(f"sparse_gemv_mlp_add_rmsnorm: needs what sparse_gemv_swiglu and sparse_gemv_add_rmsnorm "
                         f"take, down over gate's outputs, 1 to {MAX_FOLD_ROWS} rows (see can_fold_swiglu)")
    rows = x.numel() // x.shape[-1]
    gate, up = sparse_gemv_sums(x, [w_gate, w_up], [t_gate, t_up], config=configs[0], sparsity=sparsities[0],
                                scales=scales[:2], shared=shared)
    act = torch.empty((rows, gate.shape[1]), dtype=x.dtype, device=x.device)  # each down program writes its split
    h, norm = _add_rmsnorm_outputs(x, logical_shape(w_down)[0], residual, norm_weight, eps)
    used = -(-rows * gate.stride(0) // 64) * 64  # the down launch's sums after them, 256-byte aligned
    _launch(act, [w_down], [b_down], [t_down], configs[1], [h], sparsities[1], _Epilogue.ADD_RMSNORM, norm,
            scales=[scales[2]], shared=shared, x_sums=(gate, up), ws_offset=used)
    return h.reshape(residual.shape), norm.out.reshape(residual.shape)


def sparse_gemv_merged_add_rmsnorm(states: "SplitStates", weight: Tensor, bias: Optional[Tensor], threshold: float,
                                   residual: Tensor, norm_weight: Tensor, eps: float, qkv_sums: Sequence[Tensor], *,
                                   config: Optional[GemvConfig] = None, sparsity: Optional[float] = None,
                                   scales: Optional[Tensor] = None, shared: bool = False) -> tuple[Tensor, Tensor]:
    """``sparse_gemv_add_rmsnorm`` over the output of a decode attention that left its cache splits unmerged
    (``decode_attention.split_states_from_qkv_sums``): each program merges its K split of x from the splits' states
    (``store_merged_x``, rounded as the attention's merge rounds), so the merge's tail leaves the attention launch;
    this launch keeps its sums past the q/k/v sums (``qkv_sums``, which the attention read) and its finish zeroes
    those. Same result. Returns (h, out) in the residual's shape."""
    heads = states.config.group * states.kv_heads
    if not can_fold_merge(states.rows, heads, states.head_dim, weight, residual, norm_weight, states.dtype):
        raise ValueError(f"sparse_gemv_merged_add_rmsnorm: needs o over the attention's heads, 1 to {MAX_FOLD_ROWS} "
                         "rows, and what sparse_gemv_add_rmsnorm takes (see can_fold_merge)")
    rows, K = states.rows, heads * states.head_dim
    x = torch.empty((rows, K), dtype=states.dtype, device=weight.device)  # each program writes its split
    h, norm = _add_rmsnorm_outputs(x, logical_shape(weight)[0], residual, norm_weight, eps)
    used = -(-rows * qkv_sums[0].stride(0) // 64) * 64  # this launch's sums after them, 256-byte aligned
    _launch(x, [weight], [bias], [threshold], config, [h], sparsity, _Epilogue.ADD_RMSNORM, norm, scales=[scales],
            shared=shared, x_states=states, ws_offset=used, sums_to_zero=qkv_sums[0])
    return h.reshape(residual.shape), norm.out.reshape(residual.shape)


def sparse_gemv_qkv_rope(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                         thresholds: Sequence[float], head_dim: int, cos: Tensor, sin: Tensor, cache_position: Tensor,
                         k_cache: Tensor, v_cache: Tensor, q_norm: Optional[Tensor] = None,
                         k_norm: Optional[Tensor] = None, norm_eps: float = 0.0, *,
                         config: Optional[GemvConfig] = None, sparsity: Optional[float] = None,
                         scales: Optional[Sequence[Optional[Tensor]]] = None, shared: bool = False,
                         x_int8: bool = False) -> Tensor:
    """The grouped q/k/v launch whose finishing launch also normalises q and k per head (``q_norm``/``k_norm``, if
    given), rotates them and writes k and v into the static cache: ``reference_qkv_rope_`` of the three projections,
    in two launches (see ``can_fold_rope``). Returns the rotated q [B, Hq, 1, D]; k and v are written into
    ``k_cache`` / ``v_cache`` at ``cache_position``."""
    if not can_fold_rope(x, weights, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm):
        raise ValueError("sparse_gemv_qkv_rope: needs one token a row, column-major q/k/v weights of whole heads, "
                         "cos/sin [B or 1, 1, 1, D] and [B, Hkv, L, D] caches in x's dtype (see can_fold_rope)")
    B, D = x.shape[0], head_dim
    hq = logical_shape(weights[0])[0] // D
    q_out = torch.empty((B, hq, 1, D), dtype=x.dtype, device=x.device)
    rope = _QkvRope(D, cos, sin, cache_position.reshape(1), k_cache, v_cache, q_out, q_norm, k_norm, norm_eps)
    _launch(x, weights, biases, thresholds, config, None, sparsity, _Epilogue.QKV_ROPE, scales=scales, shared=shared,
            x_int8=x_int8, rope=rope)
    return q_out


# ------------------------------------------------------------------------------------------------ the launch
class _Epilogue(enum.Enum):
    """What the split-K sums become: y (+ bias) per segment; silu(gate) * up of two segments; the segments' sums
    left as they are (the next launch reads them: ``sparse_gemv_mlp_add_rmsnorm``); h = residual + y and its
    RMSNorm; q/k/v with RoPE (both always in a finishing launch: the norm needs every column's sum)."""

    STORE = "store"
    SWIGLU = "swiglu"
    SUMS = "sums"  # left in the workspace for the next launch to read (and a later one to zero)
    ADD_RMSNORM = "add_rmsnorm"
    QKV_ROPE = "qkv_rope"


@dataclass(frozen=True)
class _QkvRope:
    head_dim: int
    cos: Tensor  # [B or 1, 1, 1, D]
    sin: Tensor
    position: Tensor  # [1], the cache row written
    k_cache: Tensor  # [B, Hkv, L, D]
    v_cache: Tensor
    q_out: Tensor  # [B, Hq, 1, D]
    q_norm: Optional[Tensor]  # [D]: Qwen3's per-head RMSNorm weights (None: no norm)
    k_norm: Optional[Tensor]
    norm_eps: float


@dataclass(frozen=True)
class _AddRMSNorm:
    residual: Tensor  # [rows, N], contiguous
    norm_weight: Tensor  # [N]
    eps: float
    out: Tensor  # [rows, N]: the normalised h


def _add_rmsnorm_outputs(x: Tensor, N: int, residual: Tensor, norm_weight: Tensor, eps: float,
                         outs: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, _AddRMSNorm]:
    """h ([rows, N], ``outs[0]`` if given) and the ADD_RMSNORM finish's operands, whose ``out`` is the normalised h."""
    rows = x.numel() // x.shape[-1]
    h, out = outs if outs is not None else [torch.empty((rows, N), dtype=x.dtype, device=x.device) for _ in range(2)]
    return h, _AddRMSNorm(residual.reshape(rows, -1).contiguous(), norm_weight.contiguous(), float(eps), out)


def _subnormal_halves_fit(weights: Sequence[Tensor], cfg: GemvConfig, wfmt: int) -> bool:
    """Whether weight_math 4's inline PTX gets the words it assumes: each 32-bit word four consecutive stored bytes of
    one row (its output comes back in the order 0, 2, 1, 3, put back after the tile's sum). Triton packs a thread's
    elements four at a time in its layout's order, so this needs every thread to hold runs of at least four
    consecutive bytes of a row: at least 4 bytes a thread across the tile's columns (int8 128 columns a warp, int4
    256) and rows on 16-byte boundaries (the base and the row stride), without which the loads are not vectorized.
    On an H100 both cases summed wrong otherwise (32 columns a warp; 2100 int8 columns a row: docs/perf-log.md v52);
    on the interpreter the order is always right. One input is no exception: PyTorch gives its [N, 1] weight a row
    stride of 1, which Triton takes as a constant, so the row's alignment is unknown (an H200 summed 288 x 1 with
    signs flipped, v53)."""
    row_bytes_per_thread = cfg.block_n // (2 if wfmt == 2 else 1) // (32 * cfg.num_warps)
    return row_bytes_per_thread >= 4 and all(
        w.data_ptr() % 16 == 0 and w.stride(1) * w.element_size() % 16 == 0 for w in weights)


def _launch(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], thresholds: Sequence[float],
            config: Optional[GemvConfig], outs: Optional[Sequence[Tensor]], sparsity: Optional[float],
            epilogue: _Epilogue, norm: Optional[_AddRMSNorm] = None,
            scales: Optional[Sequence[Optional[Tensor]]] = None, shared: bool = False,
            x_int8: bool = False, rope: Optional[_QkvRope] = None,
            x_sums: Optional[tuple[Tensor, Tensor]] = None, ws_offset: int = 0,
            x_states: Optional["SplitStates"] = None, sums_to_zero: Optional[Tensor] = None) -> list[Tensor]:
    """The GEMV grid over the segments' N tiles, then, where the epilogue runs apart, its finishing launch.

    ``x_sums`` (gate, up): fp32 [M, K] views of the sums a gate/up launch left in the workspace (SUMS); this launch
    forms x = silu(gate) * up from them into ``x`` (written, not read), keeps its own sums ``ws_offset`` floats on,
    past them, and its finish (ADD_RMSNORM only) zeroes them. ``x_states``: x is instead merged from a decode
    attention's unmerged splits, and the finish zeroes the rows of ``sums_to_zero`` (the q/k/v sums that attention
    read). SUMS returns a [M, N] view of each segment's sums."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton sparse GEMV needs triton")
    nseg = len(weights)
    K = x.shape[-1]
    if any(w.shape[1] != K for w in weights):
        raise ValueError("sparse_gemv_group: every weight must take the input's width")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    max_rows = MAX_SHARED_ROWS if shared else MAX_ROWS
    if not 1 <= M <= max_rows:
        raise ValueError(f"sparse_gemv takes 1 to {max_rows} rows{' (shared mask)' if shared else ''}, got {M}")
    Ns = [logical_shape(w)[0] for w in weights]
    fmt = weight_format(weights[0])
    if any(weight_format(w) != fmt for w in weights):
        raise ValueError("sparse_gemv: one weight format per launch")
    scales = list(scales) if scales is not None else [None] * nseg
    if fmt is not None and any(s is None for s in scales):
        raise ValueError(f"sparse_gemv: {fmt} weights need their scales")
    wfmt = {None: 0, "int8": 1, "int4": 2}[fmt]
    if x_int8 and (fmt is None or M != 1):
        raise ValueError(f"x_int8 takes one row of x against int8/int4 weights, got {M} rows, weights {fmt or 'float'}")
    cfg = config or choose_config(M, sum(Ns), K, sparsity, fmt, shared, x_int8)
    if (cfg.weight_math == 3) != x_int8:  # x quantized or not is the caller's choice of result, never a config's
        raise ValueError(f"weight_math 3 is the x_int8 kernel: config {cfg} with x_int8={x_int8}")
    if x_sums is not None and (epilogue is not _Epilogue.ADD_RMSNORM or cfg.weight_math == 3 or x_int8
                               or any(t.shape != (M, K) or t.stride(1) != 1 for t in x_sums)):
        raise ValueError("x from gate/up sums takes [M, K] sums, a float-x config and the add + RMSNorm finish")
    if x_states is not None and (epilogue is not _Epilogue.ADD_RMSNORM or cfg.weight_math == 3 or x_int8
                                 or x_sums is not None or sums_to_zero is None or x_states.rows != M
                                 or x_states.config.group * x_states.kv_heads * x_states.head_dim != K):
        raise ValueError("x merged from an attention's splits takes its [rows, heads x head_dim] output, a float-x "
                         "config, the add + RMSNorm finish and the q/k/v sums to zero")
    if cfg.use_dot and cfg.compact and not (shared or M == 1):
        raise ValueError(f"packed survivors on tensor cores need one mask for all rows (a shared mask, or one row): "
                         f"{cfg}")
    if cfg.half_dot and (wfmt != 1 or x.dtype == torch.float32):  # fp16 operands would round fp32 x
        raise ValueError(f"half_dot takes int8 weights and fp16/bf16 x only: {cfg}, x {x.dtype}")
    if config is None and cfg.weight_math == 4 and not _subnormal_halves_fit(weights, cfg, wfmt):
        cfg = replace(cfg, weight_math=2)  # the permutes' fp16 sums, whatever the layout
    if config is None and cfg.weight_math in (1, 2, 4) and x.dtype == torch.float32:
        # the rule's cheaper sums round at a bf16 output's error (fp16 would also round fp32 x): fp32 x, exact sums
        cfg = replace(cfg, weight_math=0)
    if cfg.weight_math not in range(5):
        raise ValueError(f"weight_math is one of 0-4 (kernels/sparse_gemv_triton.py, WMATH): {cfg}")
    if cfg.weight_math and not (wfmt and M == 1 and cfg.in_thread and (not cfg.compact or cfg.weight_math in (2, 4))):
        raise ValueError(f"weight_math applies to one row of int8/int4 in the masked in-thread loop (2 and 4 also in "
                         f"the packed loop): {cfg}")
    if cfg.weight_math == 4 and (x.dtype == torch.float32 or (wfmt == 1 and cfg.block_k > 32)):
        # fp16 would round fp32 x; a tile's sum of up to 32 products (q + 128) x 2^-24 x 2^15 stays below 2^4
        raise ValueError(f"weight_math 4 (unsigned integers as subnormal halves) takes fp16/bf16 x and, for int8, "
                         f"block_k <= 32: {cfg}, {x.dtype}")
    if cfg.weight_math == 4 and not _subnormal_halves_fit(weights, cfg, wfmt):
        raise ValueError(f"weight_math 4 (unsigned integers as subnormal halves) takes at least 4 bytes of a row a "
                         f"thread and rows on 16-byte boundaries: {cfg}, row strides "
                         f"{[w.stride(1) * w.element_size() for w in weights]} bytes")
    if cfg.weight_math == 3 and (ACT_TILE % cfg.block_k or cfg.block_k % 4 or cfg.k_per_split % ACT_TILE):
        # one x scale per tile: a tile within one scale tile of x (and so of an int4 group), a program's inputs whole
        # scale tiles (x is quantized from k_lo); rows come four to a word
        raise ValueError(f"weight_math 3 (int8 x) takes block_k dividing {ACT_TILE} and k_per_split a multiple: {cfg}")
    if cfg.weight_math == 2 and (x.dtype == torch.float32 or (wfmt == 1 and cfg.block_k > 32)):
        # fp16 would round fp32 x; 32 int8 products of at most 128 x 8 bound a tile's fp16 sum (``half_scaled``)
        raise ValueError(f"weight_math 2 (fp16 sums) takes fp16/bf16 x and, for int8, block_k <= 32: {cfg}, {x.dtype}")
    if wfmt == 2 and cfg.use_dot:
        if INT4_GROUP % cfg.k_per_split:  # a program's sums are scaled once: its inputs must lie in one scale group
            raise ValueError(f"int4 on tensor cores needs k_per_split dividing {INT4_GROUP}: {cfg}")
        if cfg.block_n < 32:  # each nibble's dot takes half the tile's columns, at least 16 (masks cover the rest)
            cfg = replace(cfg, block_n=32)
    packed_groups_ok = cfg.compact and (INT4_GROUP % cfg.k_per_split == 0 or cfg.k_per_split % INT4_GROUP == 0)
    if wfmt == 2 and not cfg.use_dot and (INT4_GROUP % cfg.block_k or (cfg.compact and not packed_groups_ok)):
        # the CUDA-core loops scale each tile's sums (a tile within one group) or, packed, each group's (a program's
        # inputs within one group, or whole groups, each packed and summed in turn)
        raise ValueError(f"int4 on CUDA cores needs block_k dividing {INT4_GROUP} and, packed, k_per_split dividing "
                         f"it or a multiple of it: {cfg}")
    BN = cfg.block_n
    if cfg.use_dot:
        BM = max(16, next_pow2(M))
    elif cfg.in_thread and not cfg.compact:
        BM = next_pow2(M)
    elif M == 1:
        BM = 1
    else:
        raise ValueError("the [BK, BN] tile loop and the packed loop take one row; batches take use_dot or in_thread")
    if epilogue is _Epilogue.SUMS:
        ys = [x2] * nseg  # never written: the sums stay in the workspace
    else:
        ys = list(outs) if outs is not None else [torch.empty((M, N), dtype=x.dtype, device=x.device) for N in Ns]
    tiles = [-(-N // BN) for N in Ns]
    total_tiles = sum(tiles)
    # a CHUNK slot per K split and segment: the packed survivors, or W8A8's int8 words of x and their scales
    # (the packed fp16 loop reads whole tiles of a slot, up to block_k entries past the last one)
    packed = nseg * cfg.split_k * cfg.chunk + cfg.block_k if cfg.compact or cfg.weight_math == 3 else 1
    # xv: the packed x values, one fp32 a slot entry (one row), or BM of x's dtype (the tensor-core loop's columns)
    ws, cnt, idx, xv = _WORKSPACE.get(x.device, ws=ws_offset + BM * total_tiles * BN, cnt=total_tiles, idx=packed,
                                      xv=packed * (BM if cfg.use_dot else 1))
    ws = ws[ws_offset:]  # (had it grown, x_sums still hold the old buffer, which the finish zeroes before it goes)
    if cfg.use_dot and cfg.compact:
        xv = xv.view(x.dtype)
    has_bias = biases[0] is not None
    seg = []
    for i in range(nseg):
        w, y = weights[i], ys[i]
        # t < 0 keeps every input, as t = 0 does up to exact zeros (which add nothing); the kernel relies on t >= 0
        # to never keep the zero-padded inputs past the end of a split, so clamp
        sc = scales[i] if wfmt else x2  # a dummy pointer where the format has no scales
        seg.append(dict(w=w, b=biases[i] if has_bias else x2, y=y, N=Ns[i], t=max(float(thresholds[i]), 0.0),
                        swn=w.stride(0), swk=w.stride(1), sym=y.stride(0), s=sc,
                        # 16 where no group row is ever stepped over: never 1, which Triton would make a constant
                        ssg=sc.stride(0) if wfmt == 2 and sc.shape[0] > 1 else 16))
    extra = {}
    for i in (1, 2):
        if i < nseg:
            d = seg[i]
            extra.update({f"w{i}_ptr": d["w"], f"b{i}_ptr": d["b"], f"y{i}_ptr": d["y"], f"N{i}": d["N"],
                          f"threshold{i}": d["t"], f"stride_wk{i}": d["swk"], f"stride_ym{i}": d["sym"],
                          f"s{i}_ptr": d["s"], f"stride_sg{i}": d["ssg"]})
    if nseg > 1:
        extra.update(TILES1=tiles[0], TILES2=tiles[0] + (tiles[1] if nseg > 2 else 0), N_TOTAL=total_tiles * BN)
    s0 = seg[0]
    use_pdl = pdl.enabled(x.device)
    launch_pdl = {"launch_pdl": True} if use_pdl else {}
    gated = epilogue is _Epilogue.SWIGLU
    # the split-K epilogue as a second launch where launches overlap (PDL): ~1 µs less per GEMV than the grid's own
    # last arriver (docs/design.md, "Launch boundaries"). Not for the tensor-core path, which does not let the next
    # launch start early. The norm needs every column's sum: only a launch after the grid has them.
    apart = use_pdl if cfg.apart is None else cfg.apart
    # the norm needs every column's sum, the rotation the other half of each head's: only a launch after the grid
    apart = (apart and (cfg.split_k > 1 or gated) and not cfg.use_dot) or \
        epilogue in (_Epilogue.ADD_RMSNORM, _Epilogue.QKV_ROPE, _Epilogue.SUMS)
    x_prologue = {} if x_sums is None else dict(X_SWIGLU=True, g_ptr=x_sums[0], u_ptr=x_sums[1],
                                                stride_gm=x_sums[0].stride(0))
    if x_states is not None:
        a = x_states.config
        x_prologue = dict(X_MERGE=True, acc_ptr=x_states.acc, ml_ptr=x_states.ml, HKV=x_states.kv_heads,
                          NSPLIT=a.nsplit, G=a.group, GP=a.group_padded, D=x_states.head_dim, DP=a.head_dim_padded)
    jit.sparse_gemv_kernel[(total_tiles, cfg.split_k)](
        x2, s0["w"], s0["b"], s0["y"], ws, cnt, idx, xv,
        M, s0["N"], K, s0["t"],
        x2.stride(0), s0["swn"], s0["swk"], s0["sym"],
        cfg.k_per_split,
        SPLIT_K=cfg.split_k, BM=BM, BN=BN, BK=cfg.block_k, HAS_BIAS=has_bias,
        USE_DOT=cfg.use_dot, IEEE=x.dtype == torch.float32,
        UPCAST=interpreter_upcasts(x.dtype),
        EVEN_N=all(N % BN == 0 for N in Ns), EVEN_K=K % cfg.k_per_split == 0,
        IN_THREAD=cfg.in_thread, COMPACT=cfg.compact, CHUNK=cfg.chunk,
        NSEG=nseg, GATED=gated, PDL=use_pdl, APART=apart, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, WFMT=wfmt, GROUP=INT4_GROUP, HALF_DOT=cfg.half_dot, SHARED=shared and M > 1,
        WMATH=cfg.weight_math,
        ASM=inline_ptx(x.device),
        s_ptr=s0["s"],
        stride_sg=s0["ssg"], **extra, **x_prologue, **launch_pdl,
    )
    if epilogue is _Epilogue.SUMS:  # [M, N] views, rows N_TOTAL apart (each segment's tiles in turn)
        sums = ws[:M * total_tiles * BN].view(M, total_tiles * BN)
        cols = [sum(tiles[:i]) * BN for i in range(nseg)]
        return [sums[:, c:c + N] for c, N in zip(cols, Ns)]
    if norm is not None:
        BN_ROW = next_pow2(s0["N"])
        # x's gate/up sums (or the q/k/v sums of the attention x was merged from), rows 0..M-1 of theirs: zeroed by
        # programs past the rows' once this grid has read them
        zero_rows = x_sums[0] if x_sums is not None else sums_to_zero
        zero = {} if zero_rows is None else dict(M=M, z_ptr=zero_rows, Z_N=M * zero_rows.stride(0), ZERO=True)
        jit.finish_add_rmsnorm_kernel[(M + (-(-zero["Z_N"] // BN_ROW) if zero else 0),)](
            ws, s0["b"], norm.residual, norm.norm_weight, s0["y"], norm.out, s0["N"], s0["N"],
            norm.residual.stride(0), s0["sym"], norm.out.stride(0), norm.eps, BN=BN_ROW, HAS_BIAS=has_bias,
            PDL=use_pdl, num_warps=min(8, max(1, BN_ROW // 1024)), **zero, **launch_pdl,
        )
    elif rope is not None:
        D, (kc, vc), cos, sin = rope.head_dim, (rope.k_cache, rope.v_cache), rope.cos, rope.sin
        hq, hkv = Ns[0] // D, Ns[1] // D
        jit.finish_qkv_rope_kernel[(hq + 2 * hkv,)](
            ws, s0["b"], extra["b1_ptr"], extra["b2_ptr"], cos, sin, rope.position, rope.q_out, kc, vc,
            rope.q_norm if rope.q_norm is not None else cos, rope.k_norm if rope.k_norm is not None else cos,
            float(rope.norm_eps), M, total_tiles * BN, tiles[0] * BN, (tiles[0] + tiles[1]) * BN, hq, hkv,
            cos.stride(0) if cos.shape[0] > 1 else 0, sin.stride(0) if sin.shape[0] > 1 else 0,
            rope.q_out.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            D=D, BM=next_pow2(M), HAS_BIAS=has_bias, HAS_NORM=rope.q_norm is not None, PDL=use_pdl, num_warps=1,
            **launch_pdl,
        )
    elif apart:
        finish = {k: extra[k] for k in ("y1_ptr", "b1_ptr", "N1", "stride_ym1", "y2_ptr", "b2_ptr", "N2", "stride_ym2",
                                        "TILES1", "TILES2") if k in extra}
        jit.finish_kernel[(tiles[0] if gated else total_tiles,)](
            ws, s0["y"], s0["b"], M, s0["N"], total_tiles * BN if nseg > 1 else s0["N"], s0["sym"], **finish,
            # one warp whatever BN: with 4 warps, [1, 1024] tiles stored as bf16 came out wrong on the H100 (Triton
            # 3.6; 1 warp exact at every BN tried, tests/test_gpu.py); most likely the read-then-zero race between
            # warps that finish_add_rmsnorm_kernel closes with a barrier (docs/design.md, "Launch boundaries")
            NSEG=nseg, BM=BM, BN=BN, HAS_BIAS=has_bias, GATED=gated, PDL=use_pdl, num_warps=1, **launch_pdl,
        )
    return [y.reshape(*x.shape[:-1], N) for y, N in zip(ys, Ns)]
