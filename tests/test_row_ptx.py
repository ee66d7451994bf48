"""The inline PTX of the packed loop a row at a time (``weight_math`` 5) against its plain-Triton twin.

CI has no GPU, so the PTX strings run here on a small interpreter of the few instructions they use (exact integer
ops, fp16 FMAs rounded once, fp32 vector atomics). The twin (``row_fma`` with ASM off) is what the interpreter
tests of the whole GEMV run; these tests tie the PTX to it, word by word and accumulator by accumulator, including a
row that is not read (its registers hold anything). On a GPU the GEMV tests run the PTX itself."""
import re

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from teal_fx.kernels import row_ptx_triton as rp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _bits16(v: float) -> int:
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def run_ptx(text: str, n_out: int, inputs: list, memory: bytearray, rng: np.random.Generator) -> list:
    """Execute ``text`` (one inline-asm block) with $0..$(n_out-1) as outputs and the rest as ``inputs``: ints are
    32-bit registers (or 64-bit addresses into ``memory``). Registers a predicated-off load leaves are random."""
    regs: dict = {}

    def val(tok: str):
        tok = tok.strip()
        if tok.startswith("$"):
            k = int(tok[1:])
            return regs[tok] if k < n_out else inputs[k - n_out]
        if tok in regs:
            return regs[tok]
        return int(tok, 16) if tok.startswith("0x") else int(tok)

    for line in [ln.strip() for ln in text.replace("\\n", "\n").splitlines()]:
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"(@(\w+) )?([\w.:]+) (.*);", line)
        assert m, line
        pred, op, args = m.group(2), m.group(3), m.group(4)
        if pred is not None and not regs[pred]:
            if op.startswith("ld."):  # an unread row: its registers hold whatever they held
                for r in re.findall(r"\w+", args.split("}")[0]):
                    regs[r] = int(rng.integers(0, 2**32))
            continue
        if op.startswith("ld.global") and op.endswith(".v4.u32"):
            outs, addr = re.fullmatch(r"\{(.*)\}, \[(.*)\], .*", args).groups()
            a = val(addr)
            for i, r in enumerate(outs.split(",")):
                regs[r.strip()] = int.from_bytes(memory[a + 4 * i:a + 4 * i + 4], "little")
            continue
        if op == "atom.global.gpu.relaxed.add.v4.f32":
            addr, vals = re.fullmatch(r"\{.*\}, \[(.*)\], \{(.*)\}", args).groups()
            a = val(addr)
            for i, r in enumerate(vals.split(",")):
                cur = np.frombuffer(memory, dtype=np.float32, count=1, offset=a + 4 * i)[0]
                add = np.array([val(r) & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]
                memory[a + 4 * i:a + 4 * i + 4] = np.float32(cur + add).tobytes()
            continue
        if op == "mov.b32" and args.startswith("{"):
            lo, hi, src = re.fullmatch(r"\{(\w+), (\w+)\}, (.*)", args).groups()
            v = val(src)
            regs[lo], regs[hi] = v & 0xFFFF, (v >> 16) & 0xFFFF
            continue
        d, *srcs = [a.strip() for a in args.split(",")]
        v = [val(a) for a in srcs]
        if op == "setp.ne.b32":
            regs[d] = (v[0] & 0xFFFFFFFF) != v[1]
        elif op == "and.pred":
            regs[d] = v[0] and v[1]
        elif op == "shr.u32":
            regs[d] = (v[0] & 0xFFFFFFFF) >> v[1]
        elif op == "and.b32":
            regs[d] = v[0] & v[1]
        elif op == "lop3.b32":
            assert v[3] == 0x28  # (a ^ b) & c
            regs[d] = (v[0] ^ v[1]) & v[2]
        elif op == "fma.rn.f16x2":  # exact in float64, rounded to fp16 once per half
            regs[d] = sum(_bits16(_f16(v[0] >> s) * _f16(v[1] >> s) + _f16(v[2] >> s)) << s for s in (0, 16))
        elif op == "cvt.f32.f16":
            regs[d] = _f16(v[0])
        elif op == "mov.b32":
            regs[d] = v[0]
        else:
            raise AssertionError(f"the interpreter does not know {op}")
    return [regs[f"${i}"] for i in range(n_out)]


@triton.jit
def _twin_rows(w_ptr, x_ptr, a_ptr, out_ptr, NA: tl.constexpr, WFMT: tl.constexpr):
    """``row_fma``'s twin (ASM off) over one 16-byte chunk a program: row bytes w, x pair, accumulators a."""
    pid = tl.program_id(0)
    one = tl.arange(0, 1)
    a = ()
    for i in tl.static_range(NA):
        a = a + (tl.load(a_ptr + pid * NA + i + one),)
    x_pair = tl.load(x_ptr + pid)
    a = rp.row_fma(w_ptr + pid * 16 + one * 0, x_pair, 0, one * 0 + 1, a, WFMT, True, False)
    for i in tl.static_range(NA):
        tl.store(out_ptr + pid * NA + i + one, a[i])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_row_step_ptx_is_its_twin(fmt):
    """Each accumulator of the PTX row step equals the twin's, over random bytes, x (some 0: the row unread) and
    accumulators; the PTX's fma rounds once, the twin's twice (fp32, then fp16), so they may differ by one fp16 ulp
    in rare ties: the test allows that and no more."""
    rng = np.random.default_rng(0)
    int4 = fmt == "int4"
    n = 16 if int4 else 8
    rows = 64
    w = rng.integers(0, 256, size=(rows, 16), dtype=np.uint8)
    xs = rng.standard_normal(rows).astype(np.float16) * np.float16(64)
    xs[::7] = 0
    x_pairs = [(_bits16(float(x)) * 0x10001) if x != 0 else 0 for x in xs]
    acc = rng.standard_normal((rows, n)).astype(np.float16)
    acc_bits = [[int(b) * 0x10001 ^ (int(rng.integers(0, 2)) << 31) for b in acc[r].view(np.uint16)] for r in range(rows)]
    ptx = str(rp._INT4_ROW.value if int4 else rp._INT8_ROW.value)
    got = []
    for r in range(rows):
        memory = bytearray(w[r].tobytes())
        got.append(run_ptx(ptx, n, [0, x_pairs[r], 0] + acc_bits[r], memory, rng))

    to_i32 = lambda v: torch.tensor(np.array(v, dtype=np.uint32).view(np.int32), device=DEVICE)  # noqa: E731
    out = torch.zeros(rows * n, dtype=torch.int32, device=DEVICE)
    _twin_rows[(rows,)](torch.tensor(w, device=DEVICE).view(torch.int8 if not int4 else torch.uint8).reshape(-1),
                        to_i32(x_pairs), to_i32([b for row in acc_bits for b in row]), out, NA=n, WFMT=2 if int4 else 1)
    want = out.cpu().numpy().view(np.uint32).reshape(rows, n)
    for r in range(rows):
        for j in range(n):
            for s in (0, 16):
                g, e = (got[r][j] >> s) & 0xFFFF, (int(want[r][j]) >> s) & 0xFFFF
                assert abs(_f16(g) - _f16(e)) <= abs(_f16(e)) * 2**-10 + 2**-24, (r, j, s, _f16(g), _f16(e))
        if xs[r] == 0:
            assert got[r] == acc_bits[r]  # an unread row adds nothing, whatever its registers held


def test_the_halves_ptx_and_the_vector_atomic():
    """fp16x2 -> two fp32 (low half first), and the four-column atomic adds where its flag is set, not elsewhere."""
    rng = np.random.default_rng(1)
    for v in rng.integers(0, 2**32, size=50):
        v = int(v) & 0x7BFF7BFF  # finite halves
        lo, hi = run_ptx(str(rp._HALVES_AS_FP32.value), 2, [v], bytearray(), rng)
        assert (lo, hi) == (_f16(v), _f16(v >> 16))
    memory = bytearray(np.arange(8, dtype=np.float32).tobytes())
    vals = [int(np.array([f], dtype=np.float32).view(np.uint32)[0]) for f in (0.5, 1.5, -2.0, 4.0)]
    run_ptx(str(rp.ATOMIC_ADD_V4.value), 1, [16, *vals, 1], memory, rng)
    run_ptx(str(rp.ATOMIC_ADD_V4.value), 1, [0, *vals, 0], memory, rng)
    assert np.frombuffer(memory, dtype=np.float32).tolist() == [0, 1, 2, 3, 4.5, 6.5, 4, 11]
