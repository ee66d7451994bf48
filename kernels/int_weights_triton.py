"""Integer weights in Triton: int8 / packed int4 values to floats, by byte permutes rather than the conversion unit.

Shared by the sparse GEMV's loops (``sparse_gemv_triton.py``, ``x_int8_triton.py``) and the dequantizing prefill
matmul (``dequant_matmul_triton.py``). Each PTX form has a plain-Triton twin for the CPU interpreter (``ASM`` off);
the tests run the twins in CI and both on a GPU. Formats: kernels/quantize.py.
"""
import triton
import triton.language as tl


@triton.jit
def exact_float(v):
    """int32 v in [-2^22, 2^22) as fp32, exactly, without the integer-to-float conversion unit: v + 2^23 + 2^22 is a
    float's mantissa under the exponent of 2^23, so the bit pattern (0x4B400000 + v) is the float 2^23 + 2^22 + v;
    subtracting that constant leaves v. Two full-rate operations where the conversion runs at a quarter of the
    rate, which made the int8/int4 loops compute-bound (docs/perf-log.md, "Quantized weights")."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def int8_as_fp16(q, ASM: tl.constexpr):
    """int8 q as fp16, exactly: the byte q + 128 under the exponent of 1024 is the half 1152 + q, so two byte
    permutes build four halves in two registers and two paired subtractions remove 1152 (five instructions for four
    weights; a plain conversion is a quarter-rate I2F each). ASM false: the same bit pattern in Triton arithmetic
    (the CPU interpreter, which runs no PTX)."""
    if ASM:
        w = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, c;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 $0, t, 0x64646464, 0x5140;
            prmt.b32 $1, t, 0x64646464, 0x7362;
            mov.b32 c, 0x64806480;
            sub.f16x2 $0, $0, c;
            sub.f16x2 $1, $1, c;
            }""",
            constraints="=r,=r,r", args=[q], dtype=tl.float16, is_pure=True, pack=4)
    else:
        u = q.to(tl.uint8, bitcast=True).to(tl.int32)
        w = ((u ^ 0x80) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
    return w


def _int4_halves_ptx(exponent_byte: str, finish: list[str], finish_regs: str) -> str:
    """PTX for four packed int4 bytes ($4) -> eight halves in four registers: low nibbles to $0, $1, high to $2, $3,
    each under ``exponent_byte``, then ``finish`` removes the offset (128 + 8 in bf16, 1024 + 8 in fp16)."""
    lines = [f".reg .b32 l, h, {finish_regs};", "and.b32 l, $4, 0x0F0F0F0F;", "shr.u32 h, $4, 4;",
             "and.b32 h, h, 0x0F0F0F0F;"]
    lines += [f"prmt.b32 ${i}, {src}, 0x{exponent_byte * 4}, 0x{sel};"
              for i, (src, sel) in enumerate((("l", "5140"), ("l", "7362"), ("h", "5140"), ("h", "7362")))]
    return "{\n" + "\n".join(lines + finish) + "\n}"


# bf16: fma.bf16x2 (sm_80+) h * 1 - 136; fp16: h - 1032
_INT4_AS_BF16: tl.constexpr = tl.constexpr(_int4_halves_ptx(
    "43", ["mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;"]
    + [f"fma.rn.bf16x2 ${i}, ${i}, one, off;" for i in range(4)], "one, off"))
_INT4_AS_F16: tl.constexpr = tl.constexpr(_int4_halves_ptx(
    "64", ["mov.b32 off, 0x64086408;"] + [f"sub.f16x2 ${i}, ${i}, off;" for i in range(4)], "off"))


@triton.jit
def int4_as_halves(p, BF16: tl.constexpr, ASM: tl.constexpr):
    """Packed int4 bytes [BK, BN / 2] as two tiles, the low nibbles (even columns) and the high (odd), each nibble
    minus 8, in bf16 (BF16) or fp16, exactly: a nibble n under the exponent of 128 (bf16) or 1024 (fp16) is the half
    128 + n or 1024 + n, so masks and byte permutes build eight halves in four registers and four paired operations
    remove the offset (1.4 instructions a weight). ASM false: the same values in Triton arithmetic."""
    if ASM:
        if BF16:
            lo, hi = tl.inline_asm_elementwise(asm=_INT4_AS_BF16, constraints="=r,=r,=r,=r,r", args=[p],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(asm=_INT4_AS_F16, constraints="=r,=r,=r,=r,r", args=[p],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        v = p.to(tl.int32)
        ty = tl.bfloat16 if BF16 else tl.float16
        lo = ((v & 15) - 8).to(tl.float32).to(ty)
        hi = ((v >> 4) - 8).to(tl.float32).to(ty)
    return lo, hi



def _bytes_as_fp32_ptx(regs: str, prologue: list[str], sources: list[str], offset: str | None) -> str:
    """PTX for byte permutes into floats: each byte of each register in ``sources`` (built by ``prologue`` from the
    input, four packed bytes) becomes the low byte of the float 2^23 + byte, in output order; then ``offset`` (2^23
    plus the byte's bias) is subtracted from each. ``offset`` None: the byte goes to bits 8-15 under the exponent of
    2^15 instead (the float 32768 + byte), and nothing is subtracted."""
    exponent, select = ("0x4B000000", "0x744{b}") if offset else ("0x47000000", "0x74{b}4")
    lines = [f".reg .b32 {regs};", *prologue, f"mov.b32 c, {exponent};"]
    lines += [f"prmt.b32 ${4 * i + b}, {src}, c, {select.format(b=b)};" for i, src in enumerate(sources)
              for b in range(4)]
    lines += [f"sub.f32 ${j}, ${j}, {offset};" for j in range(4 * len(sources)) if offset]
    return "{\n" + "\n".join(lines) + "\n}"


# int8: q + 128 (the sign bit flipped), minus 2^23 + 128; int4: the low and high nibbles, minus 2^23 + 8. The
# offset forms leave 32768 + 128 + q and 32768 + 8 + q
_INT8_BYTES = ("t, c", ["xor.b32 t, $4, 0x80808080;"], ["t"])
_INT4_BYTES = ("l, h, c", ["and.b32 l, $8, 0x0F0F0F0F;", "shr.u32 h, $8, 4;", "and.b32 h, h, 0x0F0F0F0F;"],
               ["l", "h"])
_INT8_AS_FP32: tl.constexpr = tl.constexpr(_bytes_as_fp32_ptx(*_INT8_BYTES, "0f4B000080"))
_INT4_AS_FP32: tl.constexpr = tl.constexpr(_bytes_as_fp32_ptx(*_INT4_BYTES, "0f4B000008"))
_INT8_AS_OFFSET_FP32: tl.constexpr = tl.constexpr(_bytes_as_fp32_ptx(*_INT8_BYTES, None))
_INT4_AS_OFFSET_FP32: tl.constexpr = tl.constexpr(_bytes_as_fp32_ptx(*_INT4_BYTES, None))
INT8_OFFSET: tl.constexpr = tl.constexpr(32896.0)  # what the offset forms add to q
INT4_OFFSET: tl.constexpr = tl.constexpr(32776.0)


@triton.jit
def int8_as_fp32(q, ASM: tl.constexpr, OFFSET: tl.constexpr = False):
    """int8 q as fp32, exactly: byte permutes put q + 128 under the exponent of 2^23 (the float 2^23 + 128 + q) and one
    subtraction removes 2^23 + 128, about one integer operation a weight where ``exact_float`` of a sign-extended q
    takes two (the integer pipe, half as wide as the float one, bounded the int8 loops; docs/perf-log.md v26).
    OFFSET: INT8_OFFSET + q, the byte permute alone (the caller subtracts INT8_OFFSET times Σx once per tile)."""
    if ASM:
        w = tl.inline_asm_elementwise(
            asm=_INT8_AS_OFFSET_FP32 if OFFSET else _INT8_AS_FP32,
            constraints="=r,=r,=r,=r,r", args=[q], dtype=tl.float32, is_pure=True, pack=4)
    elif OFFSET:
        w = q.to(tl.float32) + INT8_OFFSET
    else:
        w = exact_float(q.to(tl.int32))
    return w


@triton.jit
def int4_as_fp32(p, ASM: tl.constexpr, OFFSET: tl.constexpr = False):
    """Packed int4 bytes [BK, BN / 2] as the fp32 tile [BK, BN] of nibble - 8 (low nibble: even column), exactly: the
    nibbles masked out and permuted under the exponent of 2^23, then 2^23 + 8 subtracted. OFFSET: INT4_OFFSET +
    nibble - 8, without the subtraction."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm=_INT4_AS_OFFSET_FP32 if OFFSET else _INT4_AS_FP32,
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[p], dtype=(tl.float32, tl.float32), is_pure=True,
            pack=4)
        w = tl.interleave(lo, hi)
    else:
        v = p.to(tl.int32)
        if OFFSET:
            w = (tl.interleave(v & 15, v >> 4) - 8).to(tl.float32) + INT4_OFFSET
        else:
            w = exact_float(tl.interleave(v & 15, v >> 4) - 8)
    return w


@triton.jit
def swap_middle_of_fours(v):
    """v [4n] with elements 1 and 2 of every four swapped (the column order ``int4_as_subnormal_halves`` yields)."""
    n: tl.constexpr = v.shape[0]
    return tl.reshape(tl.permute(tl.reshape(v, (n // 4, 2, 2)), (0, 2, 1)), (n,))


@triton.jit
def _swap_middle_of_fours_in_rows(v):
    """``swap_middle_of_fours`` along each row of v [rows, 4n]: the subnormal conversions' order, for their twins."""
    rows: tl.constexpr = v.shape[0]
    cols: tl.constexpr = v.shape[1]
    return tl.reshape(tl.permute(tl.reshape(v, (rows, cols // 4, 2, 2)), (0, 1, 3, 2)), (rows, cols))


@triton.jit
def int4_as_subnormal_halves(p, ASM: tl.constexpr):
    """Packed int4 bytes [BK, BN / 2] as two fp16 tiles of the nibbles n (0..15, not n - 8) as subnormal halves: the
    low nibbles n x 2^-24, the high n x 2^-20, each word's four bytes in the order 0, 2, 1, 3 (``swap_middle_of_fours``
    undoes it). A mask leaves a nibble in a half's mantissa as it is: one shift and four ANDs a word, no permute and
    no subtraction (the caller subtracts 8 Σx)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 s;
            shr.u32 s, $4, 8;
            and.b32 $0, $4, 0x000F000F;
            and.b32 $1, s, 0x000F000F;
            and.b32 $2, $4, 0x00F000F0;
            and.b32 $3, s, 0x00F000F0;
            }""",
            constraints="=r,=r,=r,=r,r", args=[p], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        v = _swap_middle_of_fours_in_rows(p.to(tl.int32))
        lo = ((v & 15).to(tl.float32) * 5.960464477539063e-08).to(tl.float16)  # n x 2^-24
        hi = ((v >> 4).to(tl.float32) * 9.5367431640625e-07).to(tl.float16)  # n x 2^-20
    return lo, hi


@triton.jit
def int8_as_subnormal_halves(q, ASM: tl.constexpr):
    """int8 q [BK, BN] as the fp16 tile of q + 128 (0..255) as subnormal halves, (q + 128) x 2^-24, each word's four
    bytes in the order 0, 2, 1, 3 (``swap_middle_of_fours`` undoes it): the sign bit flipped and the byte masked into a
    half's mantissa, three instructions per four weights and no subtraction (the caller subtracts 128 Σx)."""
    if ASM:
        w = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 s;
            shr.u32 s, $2, 8;
            lop3.b32 $0, $2, 0x00800080, 0x00FF00FF, 0x28;
            lop3.b32 $1, s, 0x00800080, 0x00FF00FF, 0x28;
            }""",
            constraints="=r,=r,r", args=[q], dtype=tl.float16, is_pure=True, pack=4)
    else:
        v = _swap_middle_of_fours_in_rows(q.to(tl.int32))
        w = ((v + 128).to(tl.float32) * 5.960464477539063e-08).to(tl.float16)  # (q + 128) x 2^-24
    return w


# ------------------------------------------------------------------------------ one stored row at a time, in PTX
# (``weight_math`` 5, the packed loop's ``packed_rows_sum``; docs/perf-log.md v44). Each thread owns one 16-byte
# chunk of every row: int8 16 columns, int4 32. A row step is, per 4-byte word w:
# - int8: a[2i] += x * ((w ^ 0x00800080) & 0x00FF00FF), a[2i+1] the same of w >> 8: (q + 128) x 2^-24 as subnormal
#   halves, columns (4i, 4i+2) and (4i+1, 4i+3);
# - int4: a[4i] += x * (w & 0x000F000F) (columns 8i, 8i+4; n x 2^-24), a[4i+1] of w >> 8 (8i+2, 8i+6), a[4i+2] +=
#   x * (w & 0x00F000F0) (8i+1, 8i+5; n x 2^-20), a[4i+3] of w >> 8 (8i+3, 8i+7).
# The load is predicated on x != 0 and not zero-filled: an unread row's registers, masked to finite subnormals, add
# x * anything = 0.


def _row_fma_ptx(int4: bool, even_n: bool) -> str:
    """PTX for one stored row: $0..$(n-1) the accumulators out; inputs: the chunk's address, x as fp16x2 (0: the row
    is not read), the L2 policy, [the chunk's column bound], the accumulators in."""
    n = 16 if int4 else 8
    addr, x, pol = f"${n}", f"${n + 1}", f"${n + 2}"
    a_in = n + 3 + (0 if even_n else 1)
    lines = ["{", ".reg .pred p;", ".reg .b32 w0, w1, w2, w3, s, t;", f"setp.ne.b32 p, {x}, 0;"]
    if not even_n:
        lines += [".reg .pred c;", f"setp.ne.b32 c, ${n + 3}, 0;", "and.pred p, p, c;"]
    lines.append(f"@p ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {{w0, w1, w2, w3}}, [{addr}], {pol};")
    for i in range(4):
        lines.append(f"shr.u32 s, w{i}, 8;")
        if int4:
            for k, (src, mask) in enumerate(((f"w{i}", "0x000F000F"), ("s", "0x000F000F"),
                                             (f"w{i}", "0x00F000F0"), ("s", "0x00F000F0"))):
                j = 4 * i + k
                lines += [f"and.b32 t, {src}, {mask};", f"fma.rn.f16x2 ${j}, t, {x}, ${a_in + j};"]
        else:
            for k, src in enumerate((f"w{i}", "s")):
                j = 2 * i + k
                lines += [f"lop3.b32 t, {src}, 0x00800080, 0x00FF00FF, 0x28;", f"fma.rn.f16x2 ${j}, t, {x}, ${a_in + j};"]
    lines.append("}")
    return "\n".join(lines)


def _row_fma_constraints(int4: bool, even_n: bool) -> str:
    n = 16 if int4 else 8
    return ",".join(["=r"] * n + ["l", "r", "l"] + ([] if even_n else ["r"]) + ["r"] * n)


# (PTX, constraints) for int8 / int4, tiles dividing N or not (the chunks past N unread)
_INT8_ROW: tl.constexpr = tl.constexpr(_row_fma_ptx(False, True))
_INT8_ROW_C: tl.constexpr = tl.constexpr(_row_fma_constraints(False, True))
_INT8_ROW_RAGGED: tl.constexpr = tl.constexpr(_row_fma_ptx(False, False))
_INT8_ROW_RAGGED_C: tl.constexpr = tl.constexpr(_row_fma_constraints(False, False))
_INT4_ROW: tl.constexpr = tl.constexpr(_row_fma_ptx(True, True))
_INT4_ROW_C: tl.constexpr = tl.constexpr(_row_fma_constraints(True, True))
_INT4_ROW_RAGGED: tl.constexpr = tl.constexpr(_row_fma_ptx(True, False))
_INT4_ROW_RAGGED_C: tl.constexpr = tl.constexpr(_row_fma_constraints(True, False))


@triton.jit
def l2_evict_first_policy(dummy, ASM: tl.constexpr):
    """A 64-bit L2 cache policy that evicts the weights first (Triton's ``evict_first`` makes one per load)."""
    if ASM:
        pol = tl.inline_asm_elementwise("createpolicy.fractional.L2::evict_first.b64 $0, 1.0;", "=l,r", [dummy],
                                        dtype=tl.int64, is_pure=True, pack=1)
    else:
        pol = dummy.to(tl.int64) * 0
    return pol


@triton.jit
def _halves(v):
    """int32 v holding two fp16 bit patterns as (low, high) fp32 (plain Triton)."""
    lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _half_bits(v):
    """fp32 v rounded to fp16, its bit pattern in the low 16 bits of an int32 (plain Triton)."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _fma_twin(a, t, xh):
    """fma.rn.f16x2 a + t * x in plain Triton (t, a: int32 of two fp16; xh: x as fp32): exact products, the sum
    rounded to fp32 then fp16 (one rounding on the GPU; the twin checks the loop, the GPU tests the PTX)."""
    alo, ahi = _halves(a)
    tlo, thi = _halves(t)
    return _half_bits(alo + tlo * xh) | (_half_bits(ahi + thi * xh) << 16)


@triton.jit
def row_fma(rows, x_pair, pol, c_ok, a, WFMT: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr):
    """Fold one stored row into the accumulators ``a`` (a tuple of int32 [BC], two fp16 each; the section comment):
    ``rows`` [BC] the address of each thread's 16 bytes of the row, ``x_pair`` int32 scalar x as fp16x2 (0: not
    read), ``c_ok`` [BC] int32 whether the chunk lies inside N (read unless EVEN_N)."""
    if ASM:
        addr = rows.to(tl.int64, bitcast=True)
        if WFMT == 2:
            if EVEN_N:
                a = tl.inline_asm_elementwise(_INT4_ROW, _INT4_ROW_C, (addr, x_pair, pol) + a, dtype=(tl.int32,) * 16,
                                              is_pure=True, pack=1)
            else:
                a = tl.inline_asm_elementwise(_INT4_ROW_RAGGED, _INT4_ROW_RAGGED_C, (addr, x_pair, pol, c_ok) + a,
                                              dtype=(tl.int32,) * 16, is_pure=True, pack=1)
        else:
            if EVEN_N:
                a = tl.inline_asm_elementwise(_INT8_ROW, _INT8_ROW_C, (addr, x_pair, pol) + a, dtype=(tl.int32,) * 8,
                                              is_pure=True, pack=1)
            else:
                a = tl.inline_asm_elementwise(_INT8_ROW_RAGGED, _INT8_ROW_RAGGED_C, (addr, x_pair, pol, c_ok) + a,
                                              dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        read = ((c_ok + 0 * x_pair) != 0) & ((x_pair + 0 * c_ok) != 0)
        xh, _ = _halves(x_pair)
        out = ()
        words = rows.to(tl.pointer_type(tl.int32))  # the chunk's four words (16-byte aligned)
        for i in tl.static_range(4):
            w = tl.load(words + i, mask=read, other=0)
            s = (w >> 8) & 0x00FFFFFF
            if WFMT == 2:
                out = out + (_fma_twin(a[4 * i], w & 0x000F000F, xh), _fma_twin(a[4 * i + 1], s & 0x000F000F, xh),
                             _fma_twin(a[4 * i + 2], w & 0x00F000F0, xh), _fma_twin(a[4 * i + 3], s & 0x00F000F0, xh))
            else:
                out = out + (_fma_twin(a[2 * i], (w ^ 0x00800080) & 0x00FF00FF, xh),
                             _fma_twin(a[2 * i + 1], (s ^ 0x00800080) & 0x00FF00FF, xh))
        a = out
    return a


_HALVES_AS_FP32: tl.constexpr = tl.constexpr("{\n.reg .b16 l, h;\nmov.b32 {l, h}, $2;\ncvt.f32.f16 $0, l;\n"
                                             "cvt.f32.f16 $1, h;\n}")


@triton.jit
def fp16x2_as_fp32(v, ASM: tl.constexpr):
    """int32 v holding two fp16 (an accumulator of ``row_fma``) as (low, high) fp32."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_HALVES_AS_FP32, "=r,=r,r", [v], dtype=(tl.float32, tl.float32),
                                           is_pure=True, pack=1)
    else:
        lo, hi = _halves(v)
    return lo, hi
