"""What holds the 50% sparse GEMV above its roofline: uneven K splits, or where the kept rows lie? (NOTES.md, v10)

Every N tile of a K split keeps the same input rows, so the split with the most survivors sets the kernel's end.
With x drawn at random each split keeps a binomial number of rows; "balanced" draws the same sparsity so that every
split keeps exactly as many; "contiguous" keeps the first half of every split (one unbroken stretch of memory per
split), "alternate" every other row. "none" keeps nothing (threshold above every |x|): what is left is fixed cost.

    python examples/probe_sparse_pattern.py      (a CUDA GPU; log: examples/results/probe_sparse_pattern_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import graph_time_us, make_case, probe_setup  # noqa: E402

from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

bw, l2 = probe_setup("probe_sparse_pattern")


def masked_x(K: int, chunk: int, sparsity: float, pattern: str, g: torch.Generator) -> torch.Tensor:
    """|x| > 1 on the kept inputs, < 1 on the others (threshold 1.0); ``pattern`` as in the module docstring."""
    idx = torch.arange(K)
    if pattern == "random":
        keep = torch.rand(K, generator=g) >= sparsity
    elif pattern == "balanced":
        keep = torch.zeros(K, dtype=torch.bool)
        for lo in range(0, K, chunk):
            n = min(chunk, K - lo)
            keep[lo + torch.randperm(n, generator=g)[: round((1 - sparsity) * n)]] = True
    elif pattern == "contiguous":
        keep = (idx % chunk) < round((1 - sparsity) * chunk)
    elif pattern == "alternate":
        keep = idx % 2 == 0
    else:  # none
        keep = torch.zeros(K, dtype=torch.bool)
    mag = torch.where(keep, 1.1 + torch.rand(K, generator=g), 0.9 * torch.rand(K, generator=g))
    sign = torch.randint(0, 2, (K,), generator=g) * 2 - 1
    return (mag * sign).to(torch.bfloat16).cuda().reshape(1, K)


g = torch.Generator().manual_seed(0)
for N, K in ((4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)):
    _, ws_col, _, _, _ = make_case(N, K, 1, 0.0, torch.bfloat16, l2)
    y = torch.empty(1, N, dtype=torch.bfloat16, device="cuda")
    cfg = sg.choose_config(1, N, K, torch.device("cuda"), 0.5)
    kps = cfg["K_PER_SPLIT"]
    line = []
    for pattern in ("random", "balanced", "contiguous", "alternate", "none"):
        times, spreads = [], []
        for rep in range(3):
            x = masked_x(K, kps, 0.5, pattern, g)
            kept = (x.abs() > 1.0).reshape(-1).float()
            per_split = torch.nn.functional.pad(kept, (0, -K % kps)).reshape(-1, kps).sum(1)
            spreads.append(float(per_split.max() / per_split.mean().clamp_min(1e-9)))
            times.append(graph_time_us([lambda i=i: sg.sparse_gemv(x, ws_col[i % len(ws_col)], None, 1.0, out=y,
                                                                   sparsity=0.5) for i in range(32)]))
        line.append(f"{pattern} {sum(times) / 3:6.2f} us" + (f" (largest split / mean {sum(spreads) / 3:.2f})"
                                                             if pattern == "random" else ""))
    roof = 0.5 * N * K * 2 / bw * 1e6
    print(f"{N}x{K} @50%, {cfg['SPLIT_K']} splits of {kps}, roof {roof:5.2f} us: " + " | ".join(line), flush=True)
    ws_col = None
