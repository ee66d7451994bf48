"""What the split-K epilogue costs, part by part (NOTES.md, v11).

The same kernel with its end cut down or changed, by text substitution in a copy of kernels/sparse_gemv.py, timed
side by side on the Llama-3-8B shapes (timing only: the cut variants' results are wrong, and say so):
- full: as shipped (fp32 atomics, barrier, acq_rel arrival counter, last arriver reads back, zeroes, writes y);
- release / relaxed: the counter increment with weaker ordering (relaxed is not a correct protocol);
- no_readback: the last arriver writes zeros instead of reading the sum back (wrong results);
- atomics: partials added, no counter and no last-arriver pass (wrong results);
- none: nothing stored (a never-true store keeps the loads alive);
- fixed64: one 64-bit integer atomic per element that carries an arrival count and a fixed-point sum (2^-24
  units); the element's last arriver sees the count complete in the value it got back, writes y and zeroes the
  word: no fence, no counter, no read-back (a prototype: no range guard);
- apart: the kernel as shipped, which where launches overlap finishes the sums in a second launch (the idea of
  two_launch, kept; every other variant is run with its in-grid epilogue);
- two_launch: "atomics" plus a second, tiny launch (programmatic dependent launch) that reads the sums back,
  zeroes the workspace and writes y: the kernel boundary orders the partials instead of a fence and a counter.

    python examples/probe_epilogue.py      (a CUDA GPU; log: examples/results/probe_epilogue_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import dependent_launches, graph_time_us, kernel_variant, make_case, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

ARRIVE = 'arrived = tl.atomic_add(counter, 1, sem="acq_rel")'
PARTIAL = 'tl.atomic_add(ws_ptr + ws_offs, acc, mask=y_mask, sem="relaxed")'
READBACK = 'total = tl.atomic_add(ws_ptr + ws_offs, zero, mask=y_mask, sem="relaxed")'
BARRIER = "tl.debug_barrier()\n                if GATED:  # one counter"
FIXED64 = '''ws64 = ws_ptr.to(tl.pointer_type(tl.int64))
            q = tl.floor(acc * 16777216.0 + 0.5).to(tl.int64) + (1 << 54)
            old = tl.atomic_add(ws64 + ws_offs, q, mask=y_mask, sem="relaxed")
            new = old + q
            n_in = (new + (1 << 53)) >> 54
            last = (n_in == SPLIT_K) & y_mask
            total = (new - (n_in << 54)).to(tl.float32) * (1.0 / 16777216.0)
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=last)
            tl.store(ws64 + ws_offs, tl.zeros_like(new), mask=last)'''
VARIANTS = {
    "full": [],
    "release": [(ARRIVE, ARRIVE.replace("acq_rel", "release"))],
    "relaxed": [(ARRIVE, ARRIVE.replace("acq_rel", "relaxed"))],
    "no_readback": [(READBACK, "total = zero")],
    "atomics": [(ARRIVE, "arrived = arrivals + 1")],
    "none": [(ARRIVE, "arrived = arrivals + 1"),
             (PARTIAL, "if tl.sum(acc) == 12345.0:\n                tl.store(ws_ptr + ws_offs, acc, mask=y_mask)")],
    "fixed64": [(PARTIAL, FIXED64), (BARRIER, "if GATED:  # one counter"), (ARRIVE, "arrived = -5")],
}
# the variants change the in-grid epilogue of v11, so they keep it even where the launcher would now finish the
# split-K sums in a second launch (APART); "apart" is the kernel as shipped
IN_GRID = ('cfg.get("APART", use_pdl)', 'cfg.get("APART", False)')


def load_variants() -> dict:
    return {name: kernel_variant(f"sg_{name}", [*subs, IN_GRID]) for name, subs in VARIANTS.items()}


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _finalize(ws_ptr, y_ptr, N, BLOCK: tl.constexpr):
    tl.extra.cuda.gdc_wait()  # the GEMV grid has finished and its atomics are visible
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    total = tl.load(ws_ptr + offs, mask=ok)
    tl.store(ws_ptr + offs, tl.zeros_like(total), mask=ok)
    tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)


def two_launch(mods: dict):
    """The "atomics" GEMV (partials only) followed by ``_finalize`` (one row, one weight, no bias)."""
    atomics = mods["atomics"]

    def sparse_gemv(x, w, bias, t, out=None, sparsity=None):
        N = w.shape[0]
        y = out if out is not None else torch.empty(1, N, dtype=x.dtype, device=x.device)
        atomics.sparse_gemv(x, w, bias, t, out=y, sparsity=sparsity)
        ws = atomics._WORKSPACE.get(x.device, ws=N, cnt=1, idx=1, xv=1)[0]
        _finalize[(triton.cdiv(N, 1024),)](ws, y, N, BLOCK=1024, num_warps=4, launch_pdl=True)
        return y
    return sparse_gemv


if __name__ == "__main__":
    bw, l2 = probe_setup("probe_epilogue")
    mods = load_variants()
    mods["apart"] = sg  # as shipped: the second launch where launches overlap
    mods["two_launch"] = type("TwoLaunch", (), {"sparse_gemv": staticmethod(two_launch(mods)),
                                                "reserve_workspace": staticmethod(mods["atomics"].reserve_workspace)})
    with dependent_launches(True):
        for N, K in ((14336, 4096), (4096, 14336), (4096, 4096), (6144, 4096)):
            for sparsity in (0.0, 0.5):
                _, ws_col, x, t, needed = make_case(N, K, 1, sparsity, torch.bfloat16, l2)
                for m in mods.values():  # int64 words: twice the fp32 workspace
                    m.reserve_workspace(x.device, 2 * N, K)
                y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
                roof = needed * N * K * 2 / bw * 1e6
                cells = []
                for name, mod in mods.items():
                    ref = sg.reference_sparse_gemv(x, ws_col[0], None, t)
                    errs = []
                    for _ in range(3):  # the words must be left zero for the next launch
                        out = mod.sparse_gemv(x, ws_col[0], None, t, sparsity=sparsity)
                        errs.append(float((out.double() - ref).norm() / ref.norm()))
                    us = graph_time_us([lambda i=i, m=mod: m.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, out=y,
                                                                         sparsity=sparsity) for i in range(32)])
                    cells.append(f"{name} {us:6.2f} (err {max(errs):.0e})")
                print(f"{N}x{K} s={sparsity:.1f} roof {roof:5.2f} us: " + " | ".join(cells), flush=True)
                ws_col = None
