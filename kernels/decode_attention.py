"""Decode attention: one query token per sequence against a static KV cache, each KV head read once.

    out = softmax(q Kᵀ · scale + mask) V        q [B, H, 1, D];  K, V [B, Hkv, L, D];  H = G · Hkv

The ``teal::decode_attention`` op, its Triton kernel, launcher and reference side by side (tests in
tests/test_decode_attention.py, the rewrite that inserts it in passes/replace_decode_attention.py).

Why a kernel of our own: in a decode step Hugging Face's sdpa path repeats K and V to all H heads (``repeat_kv``)
and Inductor lowers the call to cuDNN behind four copy kernels: ~15 µs per layer on an H100 for ~1 MB of cache
(NOTES.md, v8). Here one program reads a slice of one KV head's cache once for the G query heads that share it
(tensor cores, G padded to 16 rows); a position that every head masks (the unused tail of a static cache) is not
read at all: a mask shared by the heads, as Hugging Face passes it, is loaded as one row that masks the K/V loads
directly (a per-head mask first tests whether some head attends to the block; NOTES.md, v19); the cache length is
split over programs (flash-decoding) and the last program of a KV head to arrive combines the partial softmax states
(an arrival counter, as the sparse GEMV's split-K): one launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from teal_fx.kernels import pdl
from teal_fx.kernels.sparse_gemv import _next_pow2, interpreter_upcasts
from teal_fx.kernels.workspace import Workspace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional extra on CPU
    HAS_TRITON = False

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def reference_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """What the kernel computes, in PyTorch (any device): sdpa over K/V repeated to the query heads."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


if HAS_TRITON:

    @triton.jit
    def _scores(q, kt, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """q Kᵀ · scale (log2 e folded in) for one block of positions, fp32."""
        if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
            kt = kt.to(tl.float32)
        if IEEE or UPCAST:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        return s * qk_scale

    @triton.jit
    def _online_softmax_step(s, vt, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Fold one block's masked scores ``s`` (-inf where not attended) and values into the running max, sum and
        unnormalised output."""
        if UPCAST:
            vt = vt.to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a head with nothing kept yet: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE or UPCAST:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _attend_block(q, k_blk, v_blk, kv_mask, attend, bias, m_i, l_i, acc, qk_scale, MASK: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One block of positions: its K/V rows where ``kv_mask`` (the rest not read), the scores (+ the additive
        mask ``bias`` when MASK == 2) where ``attend`` ([heads, positions]), folded into the running softmax state."""
        kt = tl.load(k_blk, mask=kv_mask, other=0.0)
        vt = tl.load(v_blk, mask=kv_mask, other=0.0)
        s = _scores(q, kt, qk_scale, IEEE, UPCAST)
        if MASK == 2:
            s = s + bias * 1.4426950408889634
        s = tl.where(attend, s, float("-inf"))
        return _online_softmax_step(s, vt, m_i, l_i, acc, IEEE, UPCAST)

    @triton.jit
    def _merge_splits(acc_ptr, ml_ptr, first_slot, offs_g, offs_d, GP: tl.constexpr, DP: tl.constexpr,
                      NSPLIT: tl.constexpr):
        """The softmax states of a KV head's NSPLIT splits (slots from ``first_slot``, read at L2: .cg) combined:
        (unnormalised output, sum). (Loading every split at once, one [splits, D] tile per head, was slower: NOTES.md,
        v8.)"""
        m_tot = tl.full((GP,), float("-inf"), tl.float32)
        l_tot = tl.zeros((GP,), tl.float32)
        out = tl.zeros((GP, DP), tl.float32)
        for s_idx in range(0, NSPLIT):
            other = first_slot + s_idx
            m_s = tl.load(ml_ptr + other * 2 * GP + offs_g, cache_modifier=".cg")
            l_s = tl.load(ml_ptr + other * 2 * GP + GP + offs_g, cache_modifier=".cg")
            a_s = tl.load(acc_ptr + other * GP * DP + offs_g[:, None] * DP + offs_d[None, :], cache_modifier=".cg")
            m_new = tl.maximum(m_tot, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            w_old = tl.exp2(m_tot - m_safe)
            w_s = tl.exp2(m_s - m_safe)
            l_tot = l_tot * w_old + l_s * w_s
            out = out * w_old[:, None] + a_s * w_s[:, None]
            m_tot = m_new
        return out, l_tot

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, acc_ptr, ml_ptr, cnt_ptr,
        L, L_PER_SPLIT, HKV, qk_scale,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd,
        stride_mb, stride_mh, stride_ml,
        stride_ob, stride_oh, stride_od,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_L: tl.constexpr,
        NSPLIT: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        MASK_ROW: tl.constexpr = True,  # the mask is the same for every head (or there is none)
        PDL: tl.constexpr = False,  # programmatic dependent launch (kernels/pdl.py)
    ):
        """Program (b·HKV + kv head, split): the G query heads of one KV head over L_PER_SPLIT positions.
        MASK: 0 none, 1 boolean (attend where true), 2 additive (float). Softmax in base 2 (qk_scale has log2 e)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        hk = bh % HKV
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, DP)
        g_ok = offs_g < G
        d_ok = offs_d < D
        heads = hk * G + offs_g
        gd_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=gd_mask,
                    other=0.0)
        if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
            q = q.to(tl.float32)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        lo = split * L_PER_SPLIT
        hi = tl.minimum(lo + L_PER_SPLIT, L)
        for start in range(lo, hi, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            k_blk = k_ptr + b * stride_kb + hk * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd
            v_blk = v_ptr + b * stride_vb + hk * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :] * stride_vd
            bias = 0.0
            if MASK_ROW:
                # one mask row for every head: the K/V loads are masked by it directly (masked rows are not read), with
                # no test for a wholly masked block first, which cost a dependent reduction (NOTES.md, v19)
                l_ok = offs_l < hi
                l_offs = b * stride_mb + offs_l * stride_ml
                if MASK == 1:
                    keep_l = l_ok & (tl.load(mask_ptr + l_offs, mask=l_ok, other=0) != 0)
                elif MASK == 2:
                    bias_l = tl.load(mask_ptr + l_offs, mask=l_ok, other=float("-inf")).to(tl.float32)
                    keep_l = l_ok & (bias_l != float("-inf"))
                    bias = bias_l[None, :]
                else:
                    keep_l = l_ok
                m_i, l_i, acc = _attend_block(q, k_blk, v_blk, keep_l[:, None] & d_ok[None, :],
                                              g_ok[:, None] & keep_l[None, :], bias, m_i, l_i, acc, qk_scale, MASK,
                                              IEEE, UPCAST)
            else:
                valid = g_ok[:, None] & (offs_l < hi)[None, :]
                m_offs = b * stride_mb + heads[:, None] * stride_mh + offs_l[None, :] * stride_ml
                if MASK == 1:
                    keep = valid & (tl.load(mask_ptr + m_offs, mask=valid, other=0) != 0)
                else:  # MASK == 2 (no mask is a mask row)
                    bias = tl.load(mask_ptr + m_offs, mask=valid, other=float("-inf")).to(tl.float32)
                    keep = valid & (bias != float("-inf"))
                if tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0) > 0:  # else: every head masks the block, skip it
                    needed = tl.max(keep.to(tl.int32), axis=0) > 0  # positions some head attends to
                    m_i, l_i, acc = _attend_block(q, k_blk, v_blk, needed[:, None] & d_ok[None, :], keep, bias, m_i,
                                                  l_i, acc, qk_scale, MASK, IEEE, UPCAST)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        o_offs = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        if NSPLIT == 1:
            l_i = tl.where(g_ok, l_i, 1.0)  # the padding heads (never stored) divide by 1, not 0
            tl.store(o_ptr + o_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)
        else:
            # this split's softmax state (running max, sum, unnormalised output) to the workspace; the last split of
            # this KV head to arrive merges all of them and resets the counter for the next launch
            slot = bh * NSPLIT + split
            tl.store(acc_ptr + slot * GP * DP + offs_g[:, None] * DP + offs_d[None, :], acc)
            tl.store(ml_ptr + slot * 2 * GP + offs_g, m_i)
            tl.store(ml_ptr + slot * 2 * GP + GP + offs_g, l_i)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
            if arrived == NSPLIT - 1:
                out, l_tot = _merge_splits(acc_ptr, ml_ptr, bh * NSPLIT, offs_g, offs_d, GP, DP, NSPLIT)
                l_tot = tl.where(g_ok, l_tot, 1.0)
                tl.store(o_ptr + o_offs, (out / l_tot[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)
                tl.atomic_xchg(cnt_ptr + bh, 0)


# ``acc``/``ml`` the partial softmax states of the splits (written before read), ``cnt`` the arrival counters
_WORKSPACE = Workspace("teal decode attention (reserve_workspace)",
                       dtypes={"acc": torch.float32, "ml": torch.float32, "cnt": torch.int32},
                       min_sizes={"acc": 1 << 16, "ml": 1 << 12, "cnt": 1 << 10})
_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests cover the merge
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def launch_config(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, device: torch.device) -> dict:
    """Tile sizes and the split of the cache length: about two programs per SM, at least one block each."""
    G = heads // kv_heads
    DP = max(16, _next_pow2(head_dim))
    BLOCK_L = 64 if DP <= 128 else 32
    blocks = -(-length // BLOCK_L)
    nsplit = min(blocks, max(1, -(-2 * _sm_count(device) // (batch * kv_heads))))
    per_split = -(-blocks // nsplit) * BLOCK_L
    return dict(G=G, GP=max(16, _next_pow2(G)), D=head_dim, DP=DP, BLOCK_L=BLOCK_L, L_PER_SPLIT=per_split,
                NSPLIT=-(-length // per_split))


def _workspace_sizes(cfg: dict, batch: int, kv_heads: int) -> dict:
    slots = batch * kv_heads * cfg["NSPLIT"]
    return dict(acc=slots * cfg["GP"] * cfg["DP"], ml=slots * 2 * cfg["GP"], cnt=batch * kv_heads)


def reserve_workspace(device: torch.device, batch: int, heads: int, kv_heads: int, length: int, head_dim: int) -> None:
    """Allocate the scratch for launches of this shape (call before a CUDA graph is captured)."""
    device = torch.device(device)
    cfg = launch_config(batch, heads, kv_heads, length, head_dim, device)
    _WORKSPACE.reserve(device, **_workspace_sizes(cfg, batch, kv_heads))


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """Shapes and dtypes the kernel takes (the op falls back to the reference otherwise)."""
    return (
        HAS_TRITON
        and q.is_cuda
        and q.dim() == 4 == k.dim() == v.dim()
        and q.shape[2] == 1
        and q.dtype in DTYPES
        and k.dtype == v.dtype == q.dtype
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[3] == q.shape[3] <= MAX_HEAD_DIM
        and q.shape[1] % k.shape[1] == 0
        and (mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point)
    )


def decode_attention_gpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                         config: Optional[dict] = None, out: Optional[Tensor] = None) -> Tensor:
    """Launch the kernel (see ``supports``); ``mask`` broadcastable to [B, H, 1, L]; returns [B, H, 1, D]
    (into ``out`` if given). ``config`` overrides ``launch_config`` (tests use it to force splits)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton decode attention needs triton")
    B, H, _, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    cfg = dict(config) if config else launch_config(B, H, HKV, L, D, q.device)
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    acc, ml, cnt = _WORKSPACE.get(q.device, **_workspace_sizes(cfg, B, HKV))
    if mask is not None:
        mask = mask.expand(B, H, 1, L)  # stride 0 along broadcast dims
        kind = 1 if mask.dtype == torch.bool else 2
        m_strides = (mask.stride(0), mask.stride(1), mask.stride(3))
    else:
        mask, kind, m_strides = q, 0, (0, 0, 0)
    use_pdl = pdl.enabled(q.device)
    _decode_attention_kernel[(B * HKV, cfg["NSPLIT"])](
        q, k, v, mask, out, acc, ml, cnt,
        L, cfg["L_PER_SPLIT"], HKV, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        *m_strides,
        out.stride(0), out.stride(1), out.stride(3),
        G=cfg["G"], GP=cfg["GP"], D=D, DP=cfg["DP"], BLOCK_L=cfg["BLOCK_L"], NSPLIT=cfg["NSPLIT"], MASK=kind,
        MASK_ROW=m_strides[1] == 0 or H == 1, IEEE=q.dtype == torch.float32,
        UPCAST=interpreter_upcasts(q.dtype),
        PDL=use_pdl, num_warps=4, num_stages=2, **({"launch_pdl": True} if use_pdl else {}),
    )
    return out


# flexible_layout: the launcher takes any strides. Without the tag Inductor gives each call its own copy of an input
# that is not yet a buffer, so the mask every layer shares was recomputed by one kernel per layer.
@torch.library.custom_op("teal::decode_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """softmax(q Kᵀ · scale + mask) V for one query position, K/V with ``H / Hkv`` query heads per KV head.

    q [B, H, 1, D], k/v [B, Hkv, L, D], mask (bool: attend where true; float: added) broadcastable to [B, H, 1, L].
    The same result as ``scaled_dot_product_attention`` on K/V repeated to H heads (the reference, and the path
    on CPU and for shapes the kernel does not take)."""
    if supports(q, k, v, mask):
        return decode_attention_gpu(q, k, v, mask, scale)
    return reference_decode_attention(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "decode_attention: 4-D q, k, v")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "decode_attention: query heads must be a multiple of kv heads")
    return q.new_empty(q.shape)
