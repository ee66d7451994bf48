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
