"""End-to-end decode benchmark on a Llama-3-8B-shaped model (random weights, bf16), one command, one run:

    python examples/bench_decode.py [--new-tokens 256] [--sparsities 0.4,0.5] [--out examples/results/decode_h100.md]

tokens/s of the lean loop (teal_fx.generate, static cache, decode step captured as a CUDA graph through
mode="reduce-overhead") with Inductor dense and with the teal backend at each sparsity; thresholds are calibrated
on the model's own activations (uniform). Decode speed = (T(256 new) - T(1 new)) / 255, so the prefill is excluded.
The roofline is ANCHORS.md's 15.01 GB per token scaled by the read bandwidth measured in this run.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import teal_fx

WEIGHT_BYTES_PER_TOKEN = 15.01e9  # Llama-3-8B bf16: seven block linears 13.96 GB + lm_head 1.05 GB (ANCHORS.md)
BLOCK_BYTES = 13.96e9


def read_bandwidth() -> float:
    x = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    x.sum()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    torch.cuda.synchronize()
    bw = 5 * x.numel() * 2 / (time.perf_counter() - t)
    del x
    return bw


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def decode_tok_s(model, ids, new_tokens: int, **kw) -> tuple[float, float]:
    """(tokens/s of the decode steps, seconds of the first call incl. compilation)."""
    t0 = time.perf_counter()
    teal_fx.generate(model, ids, 4, eos_token_id=-1, **kw)  # compile + warm up CUDA graphs
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    times = {}
    for n in (1, new_tokens):
        best = float("inf")
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            teal_fx.generate(model, ids, n, eos_token_id=-1, **kw)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        times[n] = best
    return (new_tokens - 1) / (times[new_tokens] - times[1]), compile_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--out", default="examples/results/decode_h100.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    bw = read_bandwidth()
    roof = bw / WEIGHT_BYTES_PER_TOKEN
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e12:.2f} TB/s -> dense roofline {roof:.0f} tok/s", flush=True)
    model = build_model(args.layers)
    ids = torch.randint(0, 128256, (1, args.prompt), device="cuda")
    rows = []

    tok_s, comp = decode_tok_s(model, ids, args.new_tokens, backend="inductor", mode="reduce-overhead")
    dense = tok_s
    rows.append(("lean loop, Inductor dense", 1, tok_s, comp))
    print(rows[-1], flush=True)

    calib = torch.randint(0, 128256, (2, 256))
    plan = teal_fx.calibrate(model, calib, sparsity=0.5, method="uniform", num_sequences=2, seq_len=256, progress=False)
    for s in [float(x) for x in args.sparsities.split(",")]:
        teal_fx.attach_plan(model, plan.at(s, "uniform"), check=False)
        tok_s, comp = decode_tok_s(model, ids, args.new_tokens, backend="teal", mode="reduce-overhead")
        rows.append((f"lean loop, teal {s:.0%}", 1, tok_s, comp))
        print(rows[-1], f"x{tok_s / dense:.2f} vs dense", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30

    lines = [
        "# End-to-end decode: Llama-3-8B shape (random weights, bf16), batch 1",
        "",
        f"- date {datetime.date.today()}; {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {__import__('triton').__version__}; transformers {__import__('transformers').__version__}",
        f"- prompt {args.prompt} tokens, {args.new_tokens} new tokens; decode tok/s = 255 / (T(256) - T(1)), best of 2",
        f"- read bandwidth in this run {bw / 1e12:.2f} TB/s; dense roofline {roof:.0f} tok/s "
        f"({WEIGHT_BYTES_PER_TOKEN / 1e9:.2f} GB/token, ANCHORS.md); peak GPU memory {peak:.1f} GiB",
        "- thresholds: uniform, calibrated on the model's own activations (2 x 256 random-token sequences)",
        "",
        "| path | batch | tok/s | ms/token | vs lean dense | share of dense roofline | first call incl. compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b, t, c in rows:
        lines.append(f"| {name} | {b} | {t:.1f} | {1000 / t:.2f} | {t / dense:.2f} | {t / roof:.2f} | {c:.0f} |")
    lines += ["", "Command: `python examples/bench_decode.py`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
