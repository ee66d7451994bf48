"""Tensor-parallel decode (issue 27): dense vs teal tok/s of a model sharded by transformers' ``tp_plan="auto"``.

    python examples/bench_decode.py --tp 2 [--shape 8b|70b]      # starts this script under torchrun, one rank per GPU
    torchrun --standalone --nproc-per-node 2 examples/bench_decode_tp.py --shape 8b --sparsity 0.5

Random weights (no download): rank 0 writes a checkpoint of the chosen shape (safetensors, one file per layer, made
on the GPU) into ``--model-dir``, reused by later runs; every rank then loads its shards with ``tp_plan="auto"``.
Rows: the lean loop (``teal_fx.generate``, CUDA graphs) with Inductor dense, then teal at ``--sparsity`` with
thresholds calibrated on the sharded model itself (uniform; the ranks sum their histograms, so the plan is the one
process's). ``--shape tiny --device cpu`` runs the same path on CPU processes (gloo): a check of the script, not a
speed figure. Rank 0 prints each row and writes the table after each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import teal_fx
from bench_common import decode_speed  # examples/, on the script's path

SHAPES = {  # LlamaConfig arguments
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}


def write_random_checkpoint(shape: str, path: Path, device: str) -> None:
    """A Llama checkpoint of ``shape`` with N(0, 0.02) weights and unit norms, one safetensors file per layer, written
    tensor by tensor (never the whole model in memory): a 70B shape does not fit one GPU."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=500000.0, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    files: dict[str, dict[str, tuple]] = {}
    for k, s in shapes.items():
        part = k.split(".")[2] if k.startswith("model.layers.") else "rest"
        files.setdefault(f"layer-{part}.safetensors", {})[k] = s
    gen = torch.Generator(device=device).manual_seed(0)
    index = {}
    for name, tensors in files.items():
        out = {}
        for k, s in tensors.items():
            t = (torch.ones(s, device=device) if len(s) == 1 else
                 torch.randn(s, device=device, generator=gen) * 0.02)
            out[k] = t.to(torch.bfloat16).cpu()
            index[k] = name
        save_file(out, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg.save_pretrained(path)


def tp_speed(model, ids, backend: str, new_tokens: int, cuda: bool) -> float:
    """Decode tok/s of the lean loop (``bench_common.decode_speed``), every rank starting each call together."""
    mode = "reduce-overhead" if cuda else None
    options = None if cuda or backend != "teal" else {"compiler": "eager"}

    def run(n: int) -> None:
        dist.barrier()
        teal_fx.generate(model, ids, n, eos_token_id=-1, backend=backend, mode=mode, options=options,
                         max_cache_len=ids.shape[1] + new_tokens)

    return decode_speed(run, new_tokens)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=list(SHAPES), help="model shape (default 8b)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="teal's model-level sparsity (default 0.5)")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode steps timed (default 128)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (nccl) or cpu (gloo); default cuda")
    ap.add_argument("--model-dir", default=None, help="random checkpoint folder (default /tmp/teal_fx_tp_<shape>)")
    ap.add_argument("--out", default=None, help="default examples/results/decode_tp<N>_<shape>_<gpu>.md")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    path = Path(args.model_dir or f"/tmp/teal_fx_tp_{args.shape}")
    if rank == 0 and not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        t = time.time()
        write_random_checkpoint(args.shape, path, "cuda" if cuda else "cpu")
        print(f"wrote a random {args.shape} checkpoint to {path} in {time.time() - t:.0f}s", flush=True)
    dist.barrier()

    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (1, args.prompt)).to(args.device)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    out = Path(args.out or f"examples/results/decode_tp{world}_{args.shape}_{gpu.split()[-1].lower()}.md")
    rows: list[tuple[str, float]] = []

    def add(name: str, tok_s: float) -> None:
        rows.append((name, tok_s))
        if rank == 0:
            print(f"{name}: {tok_s:.1f} tok/s", flush=True)
            write(out, args, world, gpu, rows)

    add("lean loop, Inductor dense", tp_speed(model, ids, "inductor", args.new_tokens, cuda))
    calib = torch.randint(0, vocab, (2, 256 if cuda else 32))
    teal_fx.calibrate(model, calib, sparsity=args.sparsity, method="uniform", num_sequences=2,
                      seq_len=calib.shape[1], progress=False)
    add(f"lean loop, teal {args.sparsity:.0%}", tp_speed(model, ids, "teal", args.new_tokens, cuda))
    dist.destroy_process_group()
    return 0


def write(out: Path, args, world: int, gpu: str, rows: list) -> None:
    dense = rows[0][1]
    lines = [f"# Tensor-parallel decode: Llama {args.shape} shape (random weights), TP {world}", "",
             f"- date {datetime.date.today()}; {world} x {gpu}; torch {torch.__version__}; transformers "
             f"{__import__('transformers').__version__}; prompt {args.prompt}, {args.new_tokens} new tokens, batch 1",
             "- sharded by transformers' tp_plan='auto'; teal thresholds calibrated on the sharded model (uniform)", "",
             "| path | tok/s | vs dense |", "| --- | --- | --- |"]
    lines += [f"| {name} | {t:.1f} | {t / dense:.2f} |" for name, t in rows]
    lines += ["", f"Command: `torchrun --standalone --nproc-per-node {world} examples/bench_decode_tp.py "
              f"{' '.join(sys.argv[1:])}`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
