"""Where the time of one decode step goes: GPU kernel time vs wall time, top kernels, CUDA-graph skips.

    python examples/profile_decode.py [--layers 32] [--sparsity 0.5] [--steps 32] [--trace-dir DIR]

For the lean loop (teal_fx.generate, mode="reduce-overhead") with Inductor dense and with the teal backend, on the
Llama-3-8B-shaped model of bench_decode.py, it prints: wall ms/step, GPU busy ms/step (sum of kernel durations
from the profiler), their difference (host overhead not hidden behind the GPU), the kernels that take the most
time, and Inductor's cudagraph counters (a skipped CUDA graph shows up here and in the perf_hints log).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

import teal_fx

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import build_model  # noqa: E402


SYNC_DEBUG = False


def profile_path(name: str, model, ids, steps: int, trace_dir, **kw) -> None:
    from torch._dynamo.utils import counters

    kw["max_cache_len"] = ids.shape[1] + steps  # one cache length: every call below reuses the same graphs
    teal_fx.generate(model, ids, 4, eos_token_id=-1, **kw)  # compile + warm up
    torch.cuda.synchronize()
    t = {}
    for n in (1, steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        teal_fx.generate(model, ids, n, eos_token_id=-1, **kw)
        torch.cuda.synchronize()
        t[n] = time.perf_counter() - t0
    wall = (t[steps] - t[1]) / (steps - 1) * 1e3

    if SYNC_DEBUG:
        import traceback
        import warnings

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"   SYNC: {message}")
            traceback.print_stack(limit=12)

        old, warnings.showwarning = warnings.showwarning, show
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            teal_fx.generate(model, ids, 3, eos_token_id=-1, **kw)
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        teal_fx.generate(model, ids, steps, eos_token_id=-1, **kw)
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    cpu = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            cpu[e.key[:90]] = [e.self_cpu_time_total, e.count]
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    gpu_ms = sum(v[0] for v in kernels.values()) / 1e3 / steps  # includes the prefill: an upper bound
    print(f"\n== {name}: wall {wall:.3f} ms/step; GPU kernels {gpu_ms:.3f} ms/step (incl. prefill / {steps}); "
          f"{len(kernels)} distinct kernels", flush=True)
    for kname, (us, cnt) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"   {us / steps:9.1f} us/step  {cnt / steps:6.1f} calls/step  {kname}")
    print("   host side (self CPU time, us/step, calls/step):")
    for kname, (us, cnt) in sorted(cpu.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"   {us / steps:9.1f} us/step  {cnt / steps:6.1f} calls/step  {kname}")
    print("   cudagraph counters:", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k})
    print("   graph breaks:", dict(counters["graph_break"]) or "none", "| unique graphs:", counters["stats"]["unique_graphs"])
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/{name.replace(' ', '_')}.json")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate() with both backends")
    ap.add_argument("--sync-debug", action="store_true", help="print the Python stack of every host-device sync")
    args = ap.parse_args()
    global SYNC_DEBUG
    SYNC_DEBUG = args.sync_debug
    torch._logging.set_logs(perf_hints=True)
    torch.manual_seed(0)
    model = build_model(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
    profile_path("inductor dense", model, ids, args.steps, args.trace_dir, backend="inductor", mode="reduce-overhead")
    plan = teal_fx.calibrate(model, torch.randint(0, model.config.vocab_size, (2, 256)), sparsity=args.sparsity,
                             method="uniform", num_sequences=2, seq_len=256, progress=False)
    torch.compiler.reset()
    teal_fx.attach_plan(model, plan, check=False)
    profile_path(f"teal {args.sparsity:.0%}", model, ids, args.steps, args.trace_dir, backend="teal",
                 mode="reduce-overhead")
    if args.hf:
        from transformers import CompileConfig

        from teal_fx.generate import static_cache

        for backend in ("teal", "inductor"):
            torch.compiler.reset()
            cfg = CompileConfig(backend=backend, mode="reduce-overhead")
            kw = dict(do_sample=False, compile_config=cfg, pad_token_id=0)
            cache = static_cache(model, 1, ids.shape[1] + args.steps)  # one cache: the CUDA graph keeps its address
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, past_key_values=cache, **kw)
            t = {}
            for n in (1, args.steps):
                cache.reset()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, past_key_values=cache, **kw)
                torch.cuda.synchronize()
                t[n] = time.perf_counter() - t0
            print(f"== HF generate + {backend}: {(t[args.steps] - t[1]) / (args.steps - 1) * 1e3:.3f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
