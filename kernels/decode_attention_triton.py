"""The decode attention's Triton kernel: one query token per sequence against a static KV cache.

    out = softmax(q Kᵀ · scale + mask) V        q [B, H, 1, D];  K, V [B, Hkv, L, D];  H = G · Hkv

One program reads a slice of one KV head's cache once for the G query heads that share it (tensor cores, G padded
to 16 rows); a position that every head masks (the unused tail of a static cache) is not read; the cache length is
split over programs (flash-decoding) and the last program of a KV head to arrive merges the partial softmax states
(an arrival counter, as the sparse GEMV's split-K): one launch. The launcher is ``decode_attention.py``.
"""
import triton
import triton.language as tl


@triton.jit
def scores(q, kt, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """q Kᵀ · scale (log2 e folded in) for one block of positions, fp32."""
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
        kt = kt.to(tl.float32)
    if IEEE or UPCAST:
        s = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kt))
    return s * qk_scale

@triton.jit
def online_softmax_step(s, vt, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
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
def attend_block(q, k_blk, v_blk, kv_mask, attend, bias, m_i, l_i, acc, qk_scale, MASK: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One block of positions: its K/V rows where ``kv_mask`` (the rest not read), the scores (+ the additive
    mask ``bias`` when MASK == 2) where ``attend`` ([heads, positions]), folded into the running softmax state."""
    kt = tl.load(k_blk, mask=kv_mask, other=0.0)
    vt = tl.load(v_blk, mask=kv_mask, other=0.0)
    s = scores(q, kt, qk_scale, IEEE, UPCAST)
    if MASK == 2:
        s = s + bias * 1.4426950408889634
    s = tl.where(attend, s, float("-inf"))
    return online_softmax_step(s, vt, m_i, l_i, acc, IEEE, UPCAST)

@triton.jit
def merge_splits(acc_ptr, ml_ptr, first_slot, offs_g, offs_d, GP: tl.constexpr, DP: tl.constexpr,
                  NSPLIT: tl.constexpr):
    """The softmax states of a KV head's NSPLIT splits (slots from ``first_slot``, read at L2: .cg) combined:
    (unnormalised output, sum). (Loading every split at once, one [splits, D] tile per head, was slower at 512
    positions: docs/design.md, "Decode attention".)"""
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
def decode_attention_kernel(
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

    q_ptr [B, H, 1, D], k_ptr / v_ptr [B, HKV, L, D], mask_ptr [B, H, 1, L] (broadcast strides may be 0), o_ptr
    [B, H, 1, D], each at its strides. acc_ptr / ml_ptr: each split's unnormalised output [GP, DP] and (max, sum)
    [2, GP]; cnt_ptr: an arrival counter per (batch, KV head), zero between launches.
    qk_scale: the softmax scale times log2 e (softmax in base 2). G query heads per KV head, padded to GP (>= 16,
    the tensor cores' rows); D the head size, padded to DP; BLOCK_L positions per step; NSPLIT splits of
    L_PER_SPLIT positions. MASK: 0 none, 1 boolean (attend where true), 2 additive (float). IEEE / UPCAST as in
    the sparse GEMV kernel."""
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
            # no test for a wholly masked block first, which cost a dependent reduction (docs/design.md, "Decode attention")
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
            m_i, l_i, acc = attend_block(q, k_blk, v_blk, keep_l[:, None] & d_ok[None, :],
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
                m_i, l_i, acc = attend_block(q, k_blk, v_blk, needed[:, None] & d_ok[None, :], keep, bias, m_i,
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
            out, l_tot = merge_splits(acc_ptr, ml_ptr, bh * NSPLIT, offs_g, offs_d, GP, DP, NSPLIT)
            l_tot = tl.where(g_ok, l_tot, 1.0)
            tl.store(o_ptr + o_offs, (out / l_tot[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)
            tl.atomic_xchg(cnt_ptr + bh, 0)

