"""Where a sparse GEMV's time goes besides reading weights (NOTES.md, v5): the loop over every input vs the
compacted loop at rising sparsity up to 1.0 (nothing to read: what is left is fixed cost), an empty kernel's cost
in a CUDA graph, and the cost of the split-K fp32 atomics.

    python examples/probe_fixed_costs.py      (a CUDA GPU; log: examples/results/probe_fixed_costs_h100.log)
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import graph_time_us, make_case, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_fixed_costs")


def cfgs(N, K):
    return {
        # the launcher's own choice (the committed log predates v6, when it was the [BK, BN] tile loop here)
        "default": None,
        "c4w_kps64": sg.make_config(N, K, BN=1024, BK=16, iters=4, use_dot=False, num_warps=4, compact=True),
        "c4w_kps128": sg.make_config(N, K, BN=1024, BK=16, iters=8, use_dot=False, num_warps=4, compact=True),
        "c4w_kps256": sg.make_config(N, K, BN=1024, BK=16, iters=16, use_dot=False, num_warps=4, compact=True),
        "c4w_kps512": sg.make_config(N, K, BN=1024, BK=16, iters=32, use_dot=False, num_warps=4, compact=True),
        "c8w_kps128": sg.make_config(N, K, BN=2048, BK=16, iters=8, use_dot=False, num_warps=8, compact=True),
        "c2w_kps128": sg.make_config(N, K, BN=512, BK=16, iters=8, use_dot=False, num_warps=2, compact=True),
        "c1w_kps64": sg.make_config(N, K, BN=256, BK=16, iters=4, use_dot=False, num_warps=1, compact=True),
    }


for N, K in ((14336, 4096), (4096, 4096), (4096, 14336)):
    ws_row, ws_col, x, _, _ = make_case(N, K, 1, 0.0, torch.bfloat16, l2)
    y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
    for s in (0.5, 0.75, 0.9, 1.0):
        t = float(torch.quantile(x.float().abs().flatten(), s)) if s < 1 else 1e30
        row = []
        for name, cfg in cfgs(N, K).items():
            us = graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, config=cfg, out=y) for i in range(16)])
            row.append(f"{name} {us:6.2f}")
        print(f"{N}x{K} s={s:.2f} roof {(1-s)*N*K*2/bw*1e6:5.2f}: " + " | ".join(row), flush=True)
    ws_row = ws_col = None  # free before the next shape


# launch gap: a kernel that does nothing
@triton.jit
def _noop(p, n):
    pid = tl.program_id(0)
    if pid < 0:
        tl.store(p, n)


buf = torch.zeros(1, device="cuda")
for grid in (1, 132, 512, 2048):
    us = graph_time_us([lambda: _noop[(grid,)](buf, 1) for _ in range(16)])
    print(f"noop grid {grid}: {us:.2f} us")


# atomics: every program adds BN fp32 into a 1-D buffer
@triton.jit
def _atom(p, BN: tl.constexpr):
    pid = tl.program_id(0)
    offs = (pid % 64) * BN + tl.arange(0, BN)
    tl.atomic_add(p + offs, tl.full((BN,), 1.0, tl.float32), sem="relaxed")


big = torch.zeros(64 * 1024, device="cuda")
for progs, bn, nw in ((448, 128, 4), (448, 1024, 4), (1792, 256, 1), (896, 1024, 4)):
    us = graph_time_us([lambda: _atom[(progs,)](big, BN=bn, num_warps=nw) for _ in range(16)])
    print(f"atomics {progs}x{bn} = {progs*bn/1e3:.0f}K: {us:.2f} us")
