"""Fixed cost vs streaming rate of the one-row sparse GEMV: time as K grows, N and the launch config fixed.

A straight-line fit t(K) = a + b * bytes(K) splits a launch into a fixed cost ``a`` (launch, the wait -> x -> first
weights chain, the split-K epilogue, the tail) and a streaming rate 1/b, to compare with the read bandwidth measured
in the same run. If the stream runs near the bandwidth at 50% and ``a`` is several µs, the 50% gap is fixed cost
(NOTES.md, v11); if 1/b is well under the bandwidth, the stream itself is slow.

    python examples/probe_k_scaling.py      (a CUDA GPU; log: examples/results/probe_k_scaling_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import dependent_launches, graph_time_us, make_case, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_k_scaling")


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


CASES = {  # N: the Ks (the MLP tile rule holds for all of them, so one config per N)
    14336: (4096, 8192, 12288, 16384),
    4096: (8192, 12288, 14336, 16384),
}
for pdl_on in (True, False):
    with dependent_launches(pdl_on):
        for N, Ks in CASES.items():
            cfg = sg.make_config(N, Ks[0], BN=256, BK=16, iters=8, use_dot=False, num_warps=1, num_stages=1,
                                 in_thread=True)
            for sparsity in (0.0, 0.5, 1.0):
                mbytes, times = [], []
                for K in Ks:
                    _, ws_col, x, t, needed = make_case(N, K, 1, sparsity if sparsity < 1 else 0.0, torch.bfloat16, l2)
                    if sparsity == 1.0:
                        t, needed = float(x.abs().max()) + 1.0, 0.0
                    c = dict(cfg, SPLIT_K=-(-K // cfg["K_PER_SPLIT"]))
                    y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
                    us = graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, t, config=c,
                                                                   out=y) for i in range(32)])
                    mbytes.append(needed * N * K * 2 / 1e6)
                    times.append(us)
                    ws_col = None
                pts = " ".join(f"K={K}:{us:.2f}" for K, us in zip(Ks, times))
                if sparsity < 1.0:
                    a, b = fit(mbytes, times)
                    rate = 1 / b  # MB/µs = TB/s
                    tail = f"fixed {a:5.2f} us, stream {rate:.2f} TB/s ({rate * 1e12 / bw:.2f} of bw)"
                else:
                    tail = "nothing kept"
                print(f"pdl={int(pdl_on)} N={N} s={sparsity:.1f}: {pts} | {tail}", flush=True)

