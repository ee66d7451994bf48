"""Decode attention on the GPU: ``teal::decode_attention`` against what a decode step runs without it.

    python examples/bench_attention.py [--out examples/results/attention_<gpu>.md]

Llama-3-8B heads (32 query heads on 8 KV heads, head dim 128), bf16, static caches of 512 to 8192 positions filled
to half (the rest masked, as in a decode step), batch 1 and 4. µs per call in a CUDA graph over 32 layers' caches
(one call each, so no cache stays in L2 between calls) of: teal's kernel; Hugging Face's sdpa path compiled by
Inductor (repeat_kv, then sdpa with the boolean mask), which is what a decode step runs without the teal pass; and
sdpa with ``enable_gqa`` (no copies, eager). Also the K/V bytes at the filled length and the bandwidth they imply.
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import default_out, graph_time_us, read_bandwidth
from teal_fx.kernels import decode_attention as da

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32


def hf_sdpa(q, k, v, mask, scale):
    """The decode step's attention as Hugging Face's sdpa path writes it (repeat_kv + sdpa with a mask)."""
    b, hkv, length, d = k.shape
    rep = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, rep, length, d).reshape(b, hkv * rep, length, d)
    v = v[:, :, None].expand(b, hkv, rep, length, d).reshape(b, hkv * rep, length, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def gqa_sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def case(batch: int, length: int, fill: int, inductor) -> dict:
    scale = 1.0 / math.sqrt(HEAD_DIM)
    layers = []
    for _ in range(LAYERS):
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        layers.append((q, k, v))
    mask = (torch.arange(length, device="cuda") < fill)[None, None, None, :].expand(batch, 1, 1, length)
    da.reserve_workspace("cuda", batch, HEADS, KV_HEADS, length, HEAD_DIM)
    q, k, v = layers[0]
    ref = hf_sdpa(q.double(), k.double(), v.double(), mask, scale)
    err = float((torch.ops.teal.decode_attention(q, k, v, mask, scale).double() - ref).norm() / ref.norm())
    row = dict(batch=batch, length=length, fill=fill, err=err)
    for name, fn in (("teal", torch.ops.teal.decode_attention), ("inductor", inductor), ("gqa", gqa_sdpa)):
        row[name] = graph_time_us([lambda q=q, k=k, v=v, fn=fn: fn(q, k, v, mask, scale) for q, k, v in layers])
    row["kv_mb"] = 2 * batch * KV_HEADS * fill * HEAD_DIM * 2 / 1e6
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="default: examples/results/attention_<gpu>.md (attention_h100.md on an H100)")
    ap.add_argument("--lengths", default="512,2048,8192")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 1
    args.out = args.out or default_out("attention")
    torch.manual_seed(0)
    bw = read_bandwidth()
    inductor = torch.compile(hf_sdpa, dynamic=False)
    lines = [
        "# Decode attention: Llama-3-8B heads (32 on 8 KV heads, dim 128), bf16, one query position",
        "",
        f"- date {datetime.date.today()}; {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {__import__('triton').__version__}; read bandwidth in this run {bw / 1e12:.2f} TB/s",
        "- µs per call in a CUDA graph over 32 layers' caches; the cache is filled to `fill` positions, the rest "
        "masked (boolean mask, as Hugging Face passes it in a decode step)",
        "- inductor = repeat_kv + sdpa with the mask, compiled by Inductor (a decode step without the teal pass); "
        "gqa = eager sdpa with enable_gqa=True; rel. err = teal vs float64",
        "",
        "| batch | cache length | fill | teal µs | inductor µs | gqa sdpa µs | teal speedup vs inductor | K/V MB at fill | "
        "teal GB/s | rel. err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch in (1, 4):
        for length in [int(x) for x in args.lengths.split(",")]:
            r = case(batch, length, length // 2, inductor)
            print(r, flush=True)
            lines.append(f"| {batch} | {length} | {r['fill']} | {r['teal']:.1f} | {r['inductor']:.1f} | "
                         f"{r['gqa']:.1f} | {r['inductor'] / r['teal']:.2f} | {r['kv_mb']:.1f} | "
                         f"{r['kv_mb'] * 1e6 / (r['teal'] * 1e-6) / 1e9:.0f} | {r['err']:.1e} |")
    lines += ["", f"Command: `{shlex.join(['python', 'examples/bench_attention.py', *sys.argv[1:]])}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
