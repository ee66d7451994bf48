"""The sparse GEMV's int8-x loops (W8A8 / W4A8, ``weight_math`` 3, a plan's ``activations="int8"``), one row of x.

A program rounds its K split's masked x to int8 per ACT_TILE inputs (scale max|x| / 127), packs four inputs a word
into its scratch slot, and multiplies the weight rows four at a time: a 4 x 4 byte transpose and ``dp4a`` (int4: on
the nibbles, 8 Σx taken off), int32 sums a tile, one conversion and scale per column per tile. The loops walk every
input; a row whose x byte is 0 is left unread (``w8a8_partial``, ``w4a8_partial``). A loop over the packed nonzero
inputs only was slower at 50% (docs/perf-log.md v33). The reference is kernels/reference.py's
``quantize_activation_tiles``; why and what was measured: docs/perf-log.md v32-v33.
"""
import triton
import triton.language as tl

from teal_fx.kernels import quantize
from teal_fx.kernels.int_weights_triton import exact_float

ACT_TILE: tl.constexpr = tl.constexpr(quantize.ACT_TILE)  # inputs per int8 scale of x: one value for kernel and reference


def _dot4_ptx(nibbles: bool) -> str:
    """PTX for four rows' packed bytes (registers $w..$w+3: rows 4i..4i+3, four columns' bytes each) against a word of
    x ($x: four int8 inputs): a 4 x 4 byte transpose (six permutes: each column's bytes of the four rows in one
    register), then per column one signed dp4a (int8: $0-$3) or, for int4's two outputs a byte, its low and high
    nibbles (q + 8, unsigned) into two (even columns $0-$3, odd $4-$7)."""
    w, x = (8, 12) if nibbles else (4, 8)
    lines = [".reg .b32 a, b, c, d, t, l, h, z;", "mov.b32 z, 0;",
             f"prmt.b32 a, ${w}, ${w + 1}, 0x5140;", f"prmt.b32 b, ${w + 2}, ${w + 3}, 0x5140;",
             f"prmt.b32 c, ${w}, ${w + 1}, 0x7362;", f"prmt.b32 d, ${w + 2}, ${w + 3}, 0x7362;"]
    for col, (pair, select) in enumerate([("a, b", "0x5410"), ("a, b", "0x7632"), ("c, d", "0x5410"),
                                          ("c, d", "0x7632")]):
        lines.append(f"prmt.b32 t, {pair}, {select};")
        if nibbles:
            lines += ["and.b32 l, t, 0x0F0F0F0F;", "shr.u32 h, t, 4;", "and.b32 h, h, 0x0F0F0F0F;",
                      f"dp4a.u32.s32 ${col}, l, ${x}, z;", f"dp4a.u32.s32 ${col + 4}, h, ${x}, z;"]
        else:
            lines.append(f"dp4a.s32.s32 ${col}, t, ${x}, z;")
    return "{\n" + "\n".join(lines) + "\n}"


_INT8_DOT4: tl.constexpr = tl.constexpr(_dot4_ptx(False))
_INT4_DOT4: tl.constexpr = tl.constexpr(_dot4_ptx(True))


@triton.jit
def quantize_x_tiles(x_ptr, words_ptr, xs_ptr, k_lo, k_hi, threshold, CHUNK: tl.constexpr, ASM: tl.constexpr):
    """W8A8: this program's inputs [k_lo, k_hi) masked by t, quantized to int8 per ACT_TILE inputs (scale max|x| /
    127, to nearest), packed four to an int32 word (input k_lo + 4i + r in byte r of word i) and stored, with each
    tile's scale, in the program's scratch slot; the barrier makes them visible to all its threads. Once per program,
    its threads sharing the work, where the loop would repeat it in every thread (kernels/reference.py,
    ``quantize_activation_tiles``, is the same math)."""
    offs = k_lo + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
    x = tl.where(tl.abs(x) > threshold, x, 0.0)
    xt = tl.reshape(x, (CHUNK // ACT_TILE, ACT_TILE))
    amax = tl.max(tl.abs(xt), axis=1)
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(amax > 0, amax, 1.0)), 0.0)
    r = xt * inv[:, None]
    if ASM:  # a conversion, so the product is rounded first as the reference rounds it (no fused multiply-add)
        q = tl.inline_asm_elementwise(asm="cvt.rni.s32.f32 $0, $1;", constraints="=r,r", args=[r], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:  # to nearest, ties to even (|r| <= 127): the float 2^23 + 2^22 + q
        q = (r + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    b = tl.reshape(q & 0xFF, (CHUNK // 4, 4))
    words = tl.sum(b << (tl.arange(0, 4) * 8)[None, :], axis=1)  # disjoint bytes: the sum is the OR
    tl.store(words_ptr + tl.arange(0, CHUNK // 4), words)
    tl.store(xs_ptr + tl.arange(0, CHUNK // ACT_TILE), amax / 127.0)
    tl.debug_barrier()  # the CTA's global stores are visible to all its threads after the barrier


@triton.jit
def int8_dot4(w0, w1, w2, w3, xw, ASM: tl.constexpr):
    """[R, BN] int32: Σ_r w_r[i, n] x_r[i], w_r [R, BN] int8 the weight rows 4i + r, xw [R, 1] int32 the words of x
    (byte r: input 4i + r). On the GPU a 4 x 4 byte transpose (six permutes) and four dp4a for sixteen weights
    (``_dot4_ptx``), no conversion to floats (docs/perf-log.md v32)."""
    if ASM:
        d = tl.inline_asm_elementwise(asm=_INT8_DOT4, constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r",
                                      args=[w0, w1, w2, w3, tl.broadcast_to(xw, w0.shape)], dtype=tl.int32,
                                      is_pure=True, pack=4)
    else:
        d = (w0.to(tl.int32) * ((xw << 24) >> 24) + w1.to(tl.int32) * ((xw << 16) >> 24)
             + w2.to(tl.int32) * ((xw << 8) >> 24) + w3.to(tl.int32) * (xw >> 24))
    return d


@triton.jit
def int4_dot4(p0, p1, p2, p3, xw, ASM: tl.constexpr):
    """(even, odd), each [R, BN / 2] int32: Σ_r nibble_r x_r over the rows 4i + r of packed int4 bytes p_r [R, BN / 2]
    (low nibble: the even column, high: the odd one; nibbles are q + 8, the caller removes 8 Σx), xw as ``int8_dot4``."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm=_INT4_DOT4, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r",
            args=[p0, p1, p2, p3, tl.broadcast_to(xw, p0.shape)], dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
    else:
        x0, x1, x2, x3 = (xw << 24) >> 24, (xw << 16) >> 24, (xw << 8) >> 24, xw >> 24
        v0, v1, v2, v3 = p0.to(tl.int32), p1.to(tl.int32), p2.to(tl.int32), p3.to(tl.int32)
        lo = (v0 & 15) * x0 + (v1 & 15) * x1 + (v2 & 15) * x2 + (v3 & 15) * x3
        hi = (v0 >> 4) * x0 + (v1 >> 4) * x1 + (v2 >> 4) * x2 + (v3 >> 4) * x3
    return lo, hi


@triton.jit
def x_byte_sum(xw, ASM: tl.constexpr):
    """Σ of the four signed bytes of each word xw (one dp4a against 0x01010101 on the GPU)."""
    if ASM:
        s = tl.inline_asm_elementwise(asm="dp4a.s32.s32 $0, $1, 0x01010101, 0;", constraints="=r,r", args=[xw],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        s = ((xw << 24) >> 24) + ((xw << 16) >> 24) + ((xw << 8) >> 24) + (xw >> 24)
    return s


@triton.jit
def load_row_quads(p, stride_wk, xw, cols_ok):
    """The weight rows 4i + r (r = 0..3) at p + r * stride_wk, each read only where byte r of x's word i is nonzero. A
    row not read is left undefined, not zeroed: its x byte is 0, and an integer product with 0 is 0 whatever the
    register holds."""
    w0 = tl.load(p, mask=((xw & 0xFF) != 0)[:, None] & cols_ok, eviction_policy="evict_first")
    w1 = tl.load(p + stride_wk, mask=((xw & 0xFF00) != 0)[:, None] & cols_ok, eviction_policy="evict_first")
    w2 = tl.load(p + 2 * stride_wk, mask=((xw & 0xFF0000) != 0)[:, None] & cols_ok, eviction_policy="evict_first")
    w3 = tl.load(p + 3 * stride_wk, mask=((xw >> 24) != 0)[:, None] & cols_ok, eviction_policy="evict_first")
    return w0, w1, w2, w3


@triton.jit
def next_x_words(words_ptr, xs_ptr, j, BK: tl.constexpr, CHUNK: tl.constexpr):
    """The next tile's x words (loaded a tile ahead, as the weight rows they gate are) and the scale of the tile at
    input j of the chunk."""
    nxt = (j + BK) // 4 + tl.arange(0, BK // 4)
    return tl.load(words_ptr + nxt, mask=nxt < CHUNK // 4, other=0), tl.load(xs_ptr + j // ACT_TILE)


@triton.jit
def w8a8_partial(x_ptr, w_ptr, words_ptr, xs_ptr, k_lo, k_hi, threshold, offs_n, n_ok, stride_wk, stride_wn,
                 BK: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr):
    """Σ_k x_k W[k, offs_n] (int8 W, unscaled) over [k_lo, k_hi) with x quantized per ACT_TILE inputs
    (``quantize_x_tiles``): each BK-row tile as four [BK / 4, BN] loads of rows 4i + r, an input whose int8 value
    is 0 (dropped, or rounded to 0) leaving its row unread, int32 products and sums (``int8_dot4``), one conversion
    and the tile's x scale per column per tile."""
    quantize_x_tiles(x_ptr, words_ptr, xs_ptr, k_lo, k_hi, threshold, CHUNK, ASM)
    acc = tl.zeros((BN,), dtype=tl.float32)
    # the row pointers advance a tile at a time (an add each, where recomputing row * stride + column took three
    # instructions a row)
    p = w_ptr + (k_lo + 4 * tl.arange(0, BK // 4))[:, None] * stride_wk + offs_n[None, :] * stride_wn
    cols_ok = tl.full((1, BN), 1, tl.int1) if EVEN_N else n_ok[None, :]
    xw = tl.load(words_ptr + tl.arange(0, BK // 4))
    for k0 in range(k_lo, k_hi, BK):
        xw_next, xs = next_x_words(words_ptr, xs_ptr, k0 - k_lo, BK, CHUNK)
        w0, w1, w2, w3 = load_row_quads(p, stride_wk, xw, cols_ok)
        s = tl.sum(int8_dot4(w0, w1, w2, w3, xw[:, None], ASM), axis=0)
        acc += exact_float(s) * xs  # |s| <= 32 x 127 x 127 < 2^22
        xw = xw_next
        p += BK * stride_wk
    return acc


@triton.jit
def w4a8_partial(x_ptr, w_ptr, words_ptr, xs_ptr, k_lo, k_hi, threshold, offs_n, offs_p, p_ok, stride_wk, stride_wn,
                 s_ptr, stride_sg, BK: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr,
                 GROUP: tl.constexpr, N, ASM: tl.constexpr):
    """``w8a8_partial`` over packed int4 weights (bytes ``offs_p``: columns 2p and 2p + 1), scaled: each tile's
    int32 sums less 8 Σx (the nibbles are q + 8), times the tile's x scale and its group's scales. Returns [BN]."""
    quantize_x_tiles(x_ptr, words_ptr, xs_ptr, k_lo, k_hi, threshold, CHUNK, ASM)
    acc_lo = tl.zeros((BN // 2,), dtype=tl.float32)
    acc_hi = tl.zeros((BN // 2,), dtype=tl.float32)
    p = w_ptr + (k_lo + 4 * tl.arange(0, BK // 4))[:, None] * stride_wk + offs_p[None, :] * stride_wn
    cols_ok = tl.full((1, BN // 2), 1, tl.int1) if EVEN_N else p_ok[None, :]
    even_ok = 2 * offs_p < N
    odd_ok = 2 * offs_p + 1 < N
    xw = tl.load(words_ptr + tl.arange(0, BK // 4))
    for k0 in range(k_lo, k_hi, BK):
        xw_next, xs = next_x_words(words_ptr, xs_ptr, k0 - k_lo, BK, CHUNK)
        sg = s_ptr + (k0 // GROUP) * stride_sg + 2 * offs_p
        s_even = tl.load(sg, mask=even_ok, other=0.0).to(tl.float32) * xs
        s_odd = tl.load(sg + 1, mask=odd_ok, other=0.0).to(tl.float32) * xs
        p0, p1, p2, p3 = load_row_quads(p, stride_wk, xw, cols_ok)
        lo, hi = int4_dot4(p0, p1, p2, p3, xw[:, None], ASM)
        offset = 8 * tl.sum(x_byte_sum(xw, ASM), axis=0)
        acc_lo += exact_float(tl.sum(lo, axis=0) - offset) * s_even  # |sum| <= 32 x 15 x 127 < 2^22
        acc_hi += exact_float(tl.sum(hi, axis=0) - offset) * s_odd
        xw = xw_next
        p += BK * stride_wk
    return tl.interleave(acc_lo, acc_hi)
