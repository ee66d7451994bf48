"""Wall time of calibration + greedy allocation on a Llama-3-8B-shaped model (random weights, bf16) on one GPU.

    python examples/time_calibration.py [--layers 32] [--sparsity 0.5] [--data-free]

Uses calibrate()'s GPU defaults (TEAL's 10 x 2048 tokens; random token ids stand in for text, since no weights or
tokenizer can be downloaded here). ``--data-free``: no data, so calibrate() samples its text from the model first
(batched ``generate()``), through a stand-in tokenizer of token ids (the time does not depend on what the text
says). The progress bars show the rate per batch and per block, so a run cut short still tells how long the whole
would take.
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch

import teal_fx
from bench_decode import build_model
from teal_fx.calibrate import defaults_for


class IdTokenizer:
    """What data-free calibration asks of a tokenizer: a prompt's ids and the pad / end ids. Each character is an id."""

    pad_token_id, eos_token_id = None, 2

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[1] + [3 + ord(c) % 1000 for c in text])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--data-free", action="store_true", help="calibrate on text the model samples itself")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.layers)
    d = defaults_for(torch.device("cuda"))
    data = torch.randint(0, model.config.vocab_size, (d.num_sequences, d.seq_len))
    t = time.perf_counter()
    if args.data_free:
        plan = teal_fx.calibrate(model, sparsity=args.sparsity, method="greedy", tokenizer=IdTokenizer())
    else:
        plan = teal_fx.calibrate(model, data, sparsity=args.sparsity, method="greedy")
    total = time.perf_counter() - t
    source = "self-generated" if args.data_free else "random"
    print(f"calibration + greedy, {args.layers} layers, {d.num_sequences} x {d.seq_len} {source} tokens: {total:.0f} s "
          f"({total / 60:.1f} min); model-level sparsity {plan.model_sparsity():.3f}; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
