"""One stored row of int8 / int4 weights at a time in inline PTX, and the column-wise tail of that loop.

The pieces of ``weight_math`` 5 (``sparse_gemv_triton.packed_rows_sum``; docs/perf-log.md v44): the row step
(``row_fma``), its fp16x2 sums to fp32, one L2 policy a program, and the sums scaled and added to the split-K
workspace column by column. Each PTX form has a plain-Triton twin for the CPU interpreter (``ASM`` off);
``tests/test_row_ptx.py`` runs the PTX strings on a small interpreter against the twins.

Each thread owns one 16-byte chunk of every row: int8 16 columns, int4 32. A row step is, per 4-byte word w:
- int8: a[2i] += x * ((w ^ 0x00800080) & 0x00FF00FF), a[2i+1] the same of w >> 8: (q + 128) x 2^-24 as subnormal
  halves, columns (4i, 4i+2) and (4i+1, 4i+3);
- int4: a[4i] += x * (w & 0x000F000F) (columns 8i, 8i+4; n x 2^-24), a[4i+1] of w >> 8 (8i+2, 8i+6), a[4i+2] +=
  x * (w & 0x00F000F0) (8i+1, 8i+5; n x 2^-20), a[4i+3] of w >> 8 (8i+3, 8i+7).
The load is predicated on x != 0 and not zero-filled: an unread row's registers, masked to finite subnormals, add
x * anything = 0.
"""
import triton
import triton.language as tl


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
    """Fold one stored row into the accumulators ``a`` (a tuple of int32 [BC], two fp16 each; the module docstring):
    ``rows`` [BC] the address of each thread's 16 bytes of the row, ``x_pair`` int32 scalar x as fp16x2 (0: not
    read), ``c_ok`` [BC] int32 whether the chunk lies inside N (read unless EVEN_N)."""
    if ASM:
        bound = () if EVEN_N else (c_ok,)
        a = tl.inline_asm_elementwise(
            (_INT4_ROW if EVEN_N else _INT4_ROW_RAGGED) if WFMT == 2 else (_INT8_ROW if EVEN_N else _INT8_ROW_RAGGED),
            (_INT4_ROW_C if EVEN_N else _INT4_ROW_RAGGED_C) if WFMT == 2 else
            (_INT8_ROW_C if EVEN_N else _INT8_ROW_RAGGED_C),
            (rows.to(tl.int64, bitcast=True), x_pair, pol) + bound + a, dtype=(tl.int32,) * len(a), is_pure=True,
            pack=1)
    else:
        read = c_ok * (x_pair != 0).to(tl.int32) != 0  # (a [BC] mask: the interpreter refuses a scalar's)
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


@triton.jit
def column_zeros(BN: tl.constexpr, WFMT: tl.constexpr):
    """Zero sums for ``packed_rows_sum``'s columns: a tuple of CPT [BC] vectors."""
    CPT: tl.constexpr = 32 if WFMT == 2 else 16
    cols = ()
    for _ in tl.static_range(CPT):
        cols = cols + (tl.zeros((BN // CPT,), tl.float32),)
    return cols


@triton.jit
def columns_add(acc, part, s_ptr, pn, N, BN: tl.constexpr):
    """acc + part x scales, column by column (tuples of ``packed_rows_sum``): s_ptr the scales of the tile's
    columns' row (int8: per channel; int4: the group's), read one column at a time."""
    CPT: tl.constexpr = len(part)
    col0 = pn * BN + tl.arange(0, BN // CPT) * CPT
    out = ()
    for c in tl.static_range(CPT):
        s = tl.load(s_ptr + col0 + c, mask=col0 + c < N, other=0.0).to(tl.float32)
        out = out + (acc[c] + part[c] * s,)
    return out


# $1 += {$2, $3, $4, $5} (fp32 bit patterns) where $6 != 0: the relaxed vector atomic Triton's own atomics emit
ATOMIC_ADD_V4: tl.constexpr = tl.constexpr(
    "{\n.reg .pred p;\n.reg .b32 t<4>;\nsetp.ne.b32 p, $6, 0;\n"
    "@p atom.global.gpu.relaxed.add.v4.f32 {t0, t1, t2, t3}, [$1], {$2, $3, $4, $5};\nmov.b32 $0, 0;\n}")


@triton.jit
def columns_store(y_ptr, b_ptr, cols, pn, N, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store ``packed_rows_sum``'s columns (a launch of one K split, finished by its own programs) to y's row, the
    bias added, one column at a time."""
    CPT: tl.constexpr = len(cols)
    col0 = pn * BN + tl.arange(0, BN // CPT) * CPT
    for c in tl.static_range(CPT):
        v = cols[c]
        if HAS_BIAS:
            v += tl.load(b_ptr + col0 + c, mask=col0 + c < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + col0 + c, v.to(y_ptr.dtype.element_ty), mask=col0 + c < N)


@triton.jit
def columns_atomic_add(ws_ptr, cols, pn, N, BN: tl.constexpr, ASM: tl.constexpr):
    """Add ``packed_rows_sum``'s columns into the workspace row at ws_ptr (columns pn * BN on): four columns of a
    chunk a 16-byte vector atomic (``atom.add.v4.f32``, as Triton's own atomics), no layout conversion."""
    CPT: tl.constexpr = len(cols)
    col0 = pn * BN + tl.arange(0, BN // CPT) * CPT
    ok = col0 < N  # a chunk lies wholly inside N or past it (the launcher: N a multiple of CPT)
    for q in tl.static_range(CPT // 4):
        if ASM:
            tl.inline_asm_elementwise(
                ATOMIC_ADD_V4, "=r,l,r,r,r,r,r",
                [(ws_ptr + col0 + 4 * q).to(tl.int64, bitcast=True), cols[4 * q].to(tl.int32, bitcast=True),
                 cols[4 * q + 1].to(tl.int32, bitcast=True), cols[4 * q + 2].to(tl.int32, bitcast=True),
                 cols[4 * q + 3].to(tl.int32, bitcast=True), ok.to(tl.int32)],
                dtype=tl.int32, is_pure=False, pack=1)
        else:
            for i in tl.static_range(4):
                tl.atomic_add(ws_ptr + col0 + 4 * q + i, cols[4 * q + i], mask=ok, sem="relaxed")
