"""What the example scripts share: the read bandwidth the benchmarks measure the roofline with, CUDA-graph timing,
result names, and the accuracy scripts' WikiText-2 arguments.

The scripts run as scripts (``python examples/bench_kernels.py``), so this module is importable from them as
``bench_common`` with no path set up.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

_START = time.perf_counter()  # the progress lines' clock: seconds since the script imported this module


def read_bandwidth(gib: int = 4) -> float:
    """Bytes/s of a bf16 sum over ``gib`` GiB (read only), median of 10."""
    x = torch.randn(gib * 2**29, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x.sum()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x.sum()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x
    return x_bytes(gib) / statistics.median(times)


def timed(fn) -> float:
    """Seconds of ``fn()``, the GPU's queued work included (on a CPU-only run, wall time)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_speed(run, new_tokens: int) -> tuple[float, float]:
    """(tokens/s of the decode steps, seconds of the first call incl. compilation and CUDA-graph capture).

    ``run(n)`` generates n tokens; decode speed = (n - 1) / (T(n) - T(1)), best of 2, so the prefill is excluded.
    A progress line on stderr after the first call says, in a log cut short, which row's compile had finished.
    """
    first = timed(lambda: run(4))
    print(f"[{time.perf_counter() - _START:.0f} s] first call incl. compile {first:.0f} s; timing", file=sys.stderr,
          flush=True)
    best = {n: min(timed(lambda n=n: run(n)) for _ in range(2)) for n in (1, new_tokens)}
    return (new_tokens - 1) / (best[new_tokens] - best[1]), first


def x_bytes(gib: int) -> int:
    return gib * 2**30


def gpu_tag(name: str) -> str:
    """A short name for a GPU model, for result files: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def default_out(kind: str) -> str:
    """examples/results/<kind>_<gpu>.md for the GPU this runs on, so a run on another GPU never overwrites a table."""
    return f"examples/results/{kind}_{gpu_tag(torch.cuda.get_device_name())}.md"


def graph_time_us(calls: list, replays: int = 20) -> float:
    """Median µs per call of ``calls`` captured once in a CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times)


@contextlib.contextmanager
def dependent_launches(on: bool):
    """Launch the teal kernels with programmatic dependent launch or not (kernels/pdl.py reads TEAL_PDL at each
    launch; a CUDA graph keeps what its capture saw)."""
    before = os.environ.get("TEAL_PDL")
    os.environ["TEAL_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TEAL_PDL"]
        else:
            os.environ["TEAL_PDL"] = before


def add_rule_arguments(ap: argparse.ArgumentParser) -> None:
    """Switches of the quantized launch rule that are not on by default, for A/B runs on one machine (the table's
    command line records them)."""
    ap.add_argument("--tile-math", default="", metavar="INT8,INT4",
                    help="the fp16 tile sums one row's rule takes for int8 and int4 weights on the attention "
                         "shapes, 2 or 4 each (sparse_gemv_config.INT8_TILE_MATH, INT4_TILE_MATH)")
    ap.add_argument("--mlp-tile-math", default="", metavar="N",
                    help="the fp16 tile sums one row's rule takes for int8 and int4 weights on the MLP shapes, 2 "
                         "or 4 (sparse_gemv_config.MLP_TILE_MATH)")


def apply_rule_arguments(args: argparse.Namespace) -> str:
    """Set the rule's switches from ``add_rule_arguments``' options; returns a line naming them (empty: defaults).
    Raises ValueError on a weight_math the rule does not know."""
    from teal_fx.kernels import sparse_gemv_config as cfg

    said = []
    if args.tile_math:
        maths = args.tile_math.split(",")
        if len(maths) != 2 or not set(maths) <= {"2", "4"}:
            raise ValueError(f"--tile-math: {args.tile_math!r} is not INT8,INT4 with each 2 or 4")
        cfg.INT8_TILE_MATH, cfg.INT4_TILE_MATH = (int(v) for v in maths)
        said.append(f"INT8_TILE_MATH={maths[0]}, INT4_TILE_MATH={maths[1]}")
    if args.mlp_tile_math:
        if args.mlp_tile_math not in ("2", "4"):
            raise ValueError(f"--mlp-tile-math: {args.mlp_tile_math!r} is not 2 or 4")
        cfg.MLP_TILE_MATH = int(args.mlp_tile_math)
        said.append(f"MLP_TILE_MATH={args.mlp_tile_math}")
    return "; ".join(said)


WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def add_evaluation_arguments(ap: argparse.ArgumentParser, sparsities: str = "0.25,0.4,0.5") -> None:
    """The accuracy scripts' common options: the WikiText-2 folder, how much of test.txt, the window, the levels."""
    ap.add_argument("--data", default=str(WIKITEXT), help="folder with valid.txt (calibration) and test.txt")
    ap.add_argument("--max-tokens", type=int, default=8192 + 256, help="test tokens read")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sparsities", default=sparsities)
