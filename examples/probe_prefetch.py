"""Weights requested before the wait: can a launch's first weight rows travel while the kernel before it drains?
(NOTES.md, v14: no; its gain alone is L2 reuse between the benchmark's rotating weight copies.)

With programmatic dependent launch a GEMV's programs become resident before the previous kernel has finished and
sit in ``gdc_wait`` until it has. Their input (hence their mask) is unknown until then, their weights are not: the
variant here has each program ask L2 for the first ``PREFETCH`` rows of its K split (kept or not,
``prefetch.global.L2``, one request per 128-byte line) before it waits. At 50% half of those bytes are wasted; the
bet was that DRAM idles at launch boundaries.

The variant is built by text substitution in a copy of kernels/sparse_gemv.py (results stay exact: a prefetch
changes no value). Timed: single shapes at 50% with 1x, 4x and 8x the rotating weight copies that
examples/bench_kernels.py uses (3 x L2), and one Llama-3-8B block at 50% (4 launches, as the backend issues them),
interleaved rounds.

    python examples/probe_prefetch.py   (an sm_90+ CUDA GPU; log: examples/results/probe_prefetch_h100.log)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_kernels  # noqa: E402
from bench_kernels import bench_block, bench_shape, kernel_variant, probe_setup  # noqa: E402

WAIT_AT_TOP = """        if PDL:
            tl.extra.cuda.gdc_wait()
        pn_all = tl.program_id(0)
        pk = tl.program_id(1)
"""
SPLIT_BOUNDS = "        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)\n"
PREFETCH_THEN_WAIT = SPLIT_BOUNDS + """        if PDL:
            if PREFETCH > 0:
                _prefetch_rows_l2(w_ptr, k_lo, k_hi, pn * BN, N, stride_wk, stride_wn, PREFETCH, BN)
            tl.extra.cuda.gdc_wait()
"""
HELPER_BEFORE = "    @triton.jit\n    def _silu_times_up("
HELPER = '''    @triton.jit
    def _prefetch_rows_l2(w_ptr, k_lo, k_hi, n0, N, stride_wk, stride_wn, ROWS: tl.constexpr, BN: tl.constexpr):
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth
        rows = k_lo + tl.arange(0, ROWS)
        cols = n0 + tl.arange(0, BN // LINE) * LINE
        ok = (rows < k_hi)[:, None] & (cols < N)[None, :]
        offs = tl.where(ok, rows[:, None] * stride_wk + cols[None, :] * stride_wn, 0)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\\n\\tmov.u32 $0, 0;", "=r,l", [w_ptr + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)

'''
PARAM = "        APART: tl.constexpr = False,\n    ):"
LAUNCH = "PDL=use_pdl, APART=apart,"
SUBSTITUTIONS = [
    (WAIT_AT_TOP, "        pn_all = tl.program_id(0)\n        pk = tl.program_id(1)\n"),
    (SPLIT_BOUNDS, PREFETCH_THEN_WAIT),
    (HELPER_BEFORE, HELPER + HELPER_BEFORE),
    (PARAM, "        APART: tl.constexpr = False,\n        PREFETCH: tl.constexpr = 0,\n    ):"),
    (LAUNCH, LAUNCH + " PREFETCH=PREFETCH_ROWS if use_pdl else 0,"),
]


def prefetching_module():
    mod = kernel_variant("sg_prefetch", SUBSTITUTIONS)
    mod.PREFETCH_ROWS = 0
    return mod


bw, l2 = probe_setup("probe_prefetch")
if torch.cuda.get_device_capability()[0] < 9:
    sys.exit("probe_prefetch needs programmatic dependent launch (sm_90+)")
variant = prefetching_module()
bench_kernels.sg = variant  # bench_shape / bench_block launch through the module named sg there


def timed(prefetch: int, fn, *args, **kw):
    variant.PREFETCH_ROWS = prefetch
    return fn(*args, **kw)


SHAPES = {"gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336), "4096x4096": (4096, 4096),
          "qkv 6144x4096": (6144, 4096)}
print("== single shapes at 50%, bf16, µs (fraction of roofline); more rotating copies leave less to L2", flush=True)
for name, (N, K) in SHAPES.items():
    for mult in (1, 4, 8):
        copies = max(2, -(-3 * mult * l2 // (N * K * 2)))
        row = []
        for p in (0, 8):
            r = timed(p, bench_shape, N, K, 1, 0.5, torch.bfloat16, bw, mult * l2)
            assert r["err"] < 1e-2, r
            row.append(f"prefetch {p}: {r['us']:.2f} ({r['frac']:.3f})")
        print(f"{name}, {copies} copies ({copies * N * K * 2 / 2**20:.0f} MiB): " + "  ".join(row), flush=True)

print("== one block at 50% (4 launches, 4 layers of weights), µs, median of 3", flush=True)
for rnd in range(2):
    res = {p: statistics.median(timed(p, bench_block, 0.5, torch.bfloat16, bw, l2)["us"] for _ in range(3))
           for p in (0, 4, 8)}
    print(f"round {rnd}: " + "  ".join(f"prefetch {p}: {us:.2f} ({us - res[0]:+.2f})" for p, us in res.items()),
          flush=True)
