"""The decode attention's Triton kernel: one query token per sequence against a static KV cache.

    out = softmax(q Kᵀ · scale + mask) V        q [B, H, 1, D];  K, V [B, Hkv, L, D];  H = G · Hkv

One program reads a slice of one KV head's cache once for the G query heads that share it (tensor cores, G padded
to 16 rows); a position that every head masks (the unused tail of a static cache) is not read; the cache length is
split over programs (flash-decoding) and the last program of a KV head to arrive merges the partial softmax states
(an arrival counter, as the sparse GEMV's split-K): one launch. The launcher is ``decode_attention.py``.

QKV_SUMS: q is not given but formed, with the new k/v cache row, from the split-K sums a q/k/v GEMV launch left in
its workspace (the q/k/v + RoPE finishing launch folded in: ``qkv_from_sums``). MERGE off: the splits' states are
left for o's launch to merge (``sparse_gemv_triton.store_merged_x``), so the launch ends with its last split.
"""
import triton
import triton.language as tl

from teal_fx.kernels.sparse_gemv_triton import merge_weights, normed_rotated


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
        m_tot, w_old, w_s = merge_weights(m_tot, m_s)
        l_tot = l_tot * w_old + l_s * w_s
        out = out * w_old[:, None] + a_s * w_s[:, None]
    return out, l_tot

@triton.jit
def heads_from_sums(row_ptr, cols, offs_d, rot_d, sign, mask, b_ptr, cos, sin, n_ptr, eps, D: tl.constexpr,
                    out_ty: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, ROTATE: tl.constexpr):
    """Heads [R, DP] from a q/k/v launch's fp32 sums of one row (``row_ptr``; head r's at columns ``cols[r]`` +
    d), as ``finish_qkv_rope_kernel`` makes them: + bias, in ``out_ty``; ROTATE: normalised (HAS_NORM) and rotated
    (``normed_rotated``, cos / sin [1, DP])."""
    y = tl.load(row_ptr + cols[:, None] + offs_d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        y += tl.load(b_ptr + cols[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = y.to(out_ty)
    if ROTATE:
        y_rot = tl.load(row_ptr + cols[:, None] + rot_d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y_rot += tl.load(b_ptr + cols[:, None] + rot_d[None, :], mask=mask, other=0.0).to(tl.float32)
        nw, nw_rot = None, None
        if HAS_NORM:
            nw = tl.load(n_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            nw_rot = tl.load(n_ptr + rot_d, mask=offs_d < D, other=0.0).to(tl.float32)
        y = normed_rotated(y, y_rot.to(out_ty), sign, cos, sin, nw, nw_rot, eps, D, out_ty, HAS_NORM)
    return y


@triton.jit
def qkv_from_sums(s_ptr, b, stride_sum_b, hk, K_COL0, V_COL0, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr, stride_cos_b,
                  stride_sin_b, pos, qn_ptr, kn_ptr, eps, k_row_ptr, v_row_ptr, stride_kd, stride_vd, lo, hi,
                  offs_g, offs_d, gd_mask, G: tl.constexpr, D: tl.constexpr, out_ty: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr):
    """The q of KV head ``hk``'s G query heads in row ``b`` [GP, DP], from the q/k/v sums (q's columns, then k's from
    K_COL0, v's from V_COL0); the program whose positions [lo, hi) hold the new one also forms that KV head's k and
    v row and writes it into the cache (``k_row_ptr`` / ``v_row_ptr``: the row at that position), before its loop
    reads it (the barrier). Every program of the KV head reads these sums; the last to arrive zeroes them."""
    d_ok = offs_d < D
    rot_d = (offs_d + D // 2) % D
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * stride_cos_b + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + b * stride_sin_b + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    row = s_ptr + b * stride_sum_b
    q = heads_from_sums(row, (hk * G + offs_g) * D, offs_d, rot_d, sign, gd_mask, bq_ptr, cos, sin, qn_ptr, eps, D,
                        out_ty, HAS_BIAS, HAS_NORM, True)
    if (pos >= lo) & (pos < hi):
        one = tl.zeros((1,), tl.int32)
        kv_mask = d_ok[None, :]
        k = heads_from_sums(row + K_COL0, one + hk * D, offs_d, rot_d, sign, kv_mask, bk_ptr, cos, sin, kn_ptr, eps,
                            D, out_ty, HAS_BIAS, HAS_NORM, True)
        v = heads_from_sums(row + V_COL0, one + hk * D, offs_d, rot_d, sign, kv_mask, bv_ptr, cos, sin, kn_ptr, eps,
                            D, out_ty, HAS_BIAS, False, False)
        tl.store(k_row_ptr + offs_d[None, :] * stride_kd, k, mask=kv_mask)
        tl.store(v_row_ptr + offs_d[None, :] * stride_vd, v, mask=kv_mask)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier
    return q


@triton.jit
def zero_qkv_sums(s_ptr, b, stride_sum_b, hk, K_COL0, V_COL0, offs_g, offs_d, gd_mask, G: tl.constexpr, D: tl.constexpr):
    """Zero the sums ``qkv_from_sums`` read for KV head ``hk`` of row ``b`` (its query heads', its k's and v's)."""
    row = s_ptr + b * stride_sum_b
    tl.store(row + (hk * G + offs_g)[:, None] * D + offs_d[None, :], tl.zeros(gd_mask.shape, tl.float32),
             mask=gd_mask)
    d_ok = offs_d < D
    tl.store(row + K_COL0 + hk * D + offs_d, tl.zeros(offs_d.shape, tl.float32), mask=d_ok)
    tl.store(row + V_COL0 + hk * D + offs_d, tl.zeros(offs_d.shape, tl.float32), mask=d_ok)


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
    # the last program of each KV head merges the splits (and zeroes the q/k/v sums); off, each split's softmax state
    # is left in acc_ptr / ml_ptr for the next launch to merge (o's: ``store_merged_x``), which zeroes the sums
    MERGE: tl.constexpr = True,
    # q (and the new k/v row, written to the cache at pos_ptr[0]) formed from a q/k/v GEMV's sums (``qkv_from_sums``;
    # s_ptr [B, >= V_COL0 + HKV * D], rows stride_sum_b), its biases (HAS_BIAS), RoPE's cos / sin ([B or 1, D], rows
    # stride_cos_b / stride_sin_b, 0 when shared) and Qwen3's q/k norms (HAS_NORM); the sums zeroed by the last program
    # of each KV head. q_ptr is then not read.
    QKV_SUMS: tl.constexpr = False, s_ptr=None, stride_sum_b=0, K_COL0=0, V_COL0=0, bq_ptr=None, bk_ptr=None,
    bv_ptr=None, cos_ptr=None, sin_ptr=None, stride_cos_b=0, stride_sin_b=0, pos_ptr=None, qn_ptr=None, kn_ptr=None,
    eps=0.0, HAS_BIAS: tl.constexpr = False, HAS_NORM: tl.constexpr = False,
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
    lo = split * L_PER_SPLIT
    hi = tl.minimum(lo + L_PER_SPLIT, L)
    if QKV_SUMS:
        pos = tl.load(pos_ptr)
        q = qkv_from_sums(s_ptr, b, stride_sum_b, hk, K_COL0, V_COL0, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr,
                          stride_cos_b, stride_sin_b, pos, qn_ptr, kn_ptr, eps,
                          k_ptr + b * stride_kb + hk * stride_kh + pos * stride_kl,
                          v_ptr + b * stride_vb + hk * stride_vh + pos * stride_vl, stride_kd, stride_vd, lo, hi,
                          offs_g, offs_d, gd_mask, G, D, o_ptr.dtype.element_ty, HAS_BIAS, HAS_NORM)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=gd_mask,
                    other=0.0)
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots; the GPU never takes this branch
        q = q.to(tl.float32)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
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
        if QKV_SUMS:  # (every warp read them in the prologue, before its barrier)
            zero_qkv_sums(s_ptr, b, stride_sum_b, hk, K_COL0, V_COL0, offs_g, offs_d, gd_mask, G, D)
    else:
        # this split's softmax state (running max, sum, unnormalised output) to the workspace; the last split of
        # this KV head to arrive merges all of them and resets the counter for the next launch
        slot = bh * NSPLIT + split
        tl.store(acc_ptr + slot * GP * DP + offs_g[:, None] * DP + offs_d[None, :], acc)
        tl.store(ml_ptr + slot * 2 * GP + offs_g, m_i)
        tl.store(ml_ptr + slot * 2 * GP + GP + offs_g, l_i)
        if MERGE:
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
            if arrived == NSPLIT - 1:
                out, l_tot = merge_splits(acc_ptr, ml_ptr, bh * NSPLIT, offs_g, offs_d, GP, DP, NSPLIT)
                l_tot = tl.where(g_ok, l_tot, 1.0)
                tl.store(o_ptr + o_offs, (out / l_tot[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)
                if QKV_SUMS:  # every program of this KV head has read them: it arrived
                    zero_qkv_sums(s_ptr, b, stride_sum_b, hk, K_COL0, V_COL0, offs_g, offs_d, gd_mask, G, D)
                tl.atomic_xchg(cnt_ptr + bh, 0)

