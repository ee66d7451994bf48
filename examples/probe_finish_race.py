"""Reproducer of the v15 race (NOTES.md): the add + RMSNorm finish against `residual + sparse_linear` on 4 and 6
rows, three calls each, counting the wrong columns per row. Before the barrier in `_finish_add_rmsnorm_kernel`
some columns came out with y = 0 (their sums zeroed by another warp before they were read). GPU only.

    python examples/probe_finish_race.py            # TEAL_PDL=0 to launch without programmatic dependent launch
"""
import os

import torch

from teal_fx.kernels import sparse_gemv as sg
torch.manual_seed(0)
dtype = torch.float16
N, K = 4096, 4096
for rows in (4, 6):
    x = torch.randn(rows, 1, K).to(dtype).cuda()
    w = (torch.randn(N, K) / K**0.5).to(dtype).cuda().t().contiguous().t()
    res = torch.randn(rows, 1, N).to(dtype).cuda()
    nw = torch.ones(N, dtype=dtype).cuda()
    t = float(torch.quantile(x.float().abs().flatten().cpu(), 0.5))
    yk = torch.ops.teal.sparse_linear(x, w, None, t, 1.0, 0.5)
    want = res + yk
    for trial in range(3):
        h, out = sg.sparse_gemv_add_rmsnorm(x, w, None, t, res, nw, 1e-5, sparsity=0.5)
        d = (h.float() - want.float()).abs().reshape(rows, N)
        bad = (d > 0.02 * want.float().abs().reshape(rows, N).clamp_min(0.05))
        print("pdl", os.environ.get("TEAL_PDL", "1"), "rows", rows, "trial", trial, "bad per row", bad.sum(1).tolist(), flush=True)
        if bad.any():
            r = int(bad.sum(1).argmax())
            idx = bad[r].nonzero().flatten()
            print("   row", r, "first bad cols", idx[:12].tolist(), "ratio", (h.reshape(rows, N)[r, idx[:6]].float() - res.reshape(rows, N)[r, idx[:6]].float()) / yk.reshape(rows, N)[r, idx[:6]].float(), flush=True)
