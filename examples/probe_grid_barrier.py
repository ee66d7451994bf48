"""What does a grid-wide barrier inside one persistent launch cost, against a kernel boundary under PDL?

NOTES v16-v18 leave the layer's chain of 10 dependent launches as what stands between the decode step and its targets,
and a persistent kernel per layer (grid-wide barriers between its phases instead of launches) as the lever. A barrier
removes only the synchronisation part of a boundary: after it, each program still loads its input, forms its mask and
waits for its first weights. So this measures that part alone, for a one-wave grid of the GEMV's shape (1792 one-warp
programs), doing no work:
- ``launches``: R launches in a CUDA graph, plainly and with programmatic dependent launch (each program waits for
  the previous grid, then lets the next one launch), as the teal kernels chain;
- ``barrier``: one launch of R rounds, each program arriving on a counter (release) and spinning until every program
  of the round has (acquire), as a persistent kernel would between its phases; spinning on atomics or on plain
  volatile loads followed by one acquiring atomic.

    python examples/probe_grid_barrier.py   (an sm_90+ CUDA GPU; log: examples/results/probe_grid_barrier_h100.log)
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import graph_time_us  # noqa: E402


@triton.jit
def _noop_kernel(out_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


@triton.jit
def _barrier_rounds_kernel(cnt_ptr, out_ptr, programs, ROUNDS: tl.constexpr, POLL_LOADS: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, 32)
    one = lane == 0  # one arrival per program, whichever threads a scalar atomic would run on
    for r in range(ROUNDS):
        tl.atomic_add(cnt_ptr + lane * 0, tl.full((32,), 1, tl.int32), mask=one, sem="release")
        target = (r + 1) * programs
        if POLL_LOADS:  # spin on plain volatile loads, then one acquiring atomic
            seen = tl.load(cnt_ptr, volatile=True)
            while seen < target:
                seen = tl.load(cnt_ptr, volatile=True)
            tl.atomic_add(cnt_ptr, 0, sem="acquire")
        else:  # spin on acquiring atomics (read-modify-writes of the one counter)
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
            while seen < target:
                seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    tl.store(out_ptr + pid, pid)


def main() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        sys.exit("probe_grid_barrier needs an sm_90+ CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)
    rounds = 64
    for programs in (132, 264, 1056, 1792, 3584):
        out = torch.empty(programs, dtype=torch.int32, device="cuda")
        cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
        plain = graph_time_us([lambda: _noop_kernel[(programs,)](out, PDL=False, num_warps=1)] * rounds)
        chained = graph_time_us([lambda: _noop_kernel[(programs,)](out, PDL=True, num_warps=1, launch_pdl=True)]
                                * rounds)

        barrier_us = {}
        for poll_loads in (False, True):
            def rounds_of(n, poll_loads=poll_loads):
                def call():
                    cnt.zero_()
                    _barrier_rounds_kernel[(programs,)](cnt, out, programs, ROUNDS=n, POLL_LOADS=poll_loads,
                                                        num_warps=1)
                return call

            # µs per round: a launch of R rounds minus a launch of one (the zeroing and the launch itself)
            many, one = graph_time_us([rounds_of(rounds)]), graph_time_us([rounds_of(1)])
            barrier_us[poll_loads] = (many - one) / (rounds - 1)
        print(f"{programs:5d} one-warp programs: a launch boundary {plain:5.2f} µs plainly, {chained:5.2f} µs with "
              f"PDL; a grid barrier {barrier_us[False]:5.2f} µs polling with atomics, {barrier_us[True]:5.2f} µs "
              f"polling with loads", flush=True)


if __name__ == "__main__":
    main()
