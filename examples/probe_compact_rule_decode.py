"""End to end, the packed-loop switch of v16 (0.6 on every shape) against v17's (``compact_from``: 0.7 on the MLP
shapes, 0.85 on the attention ones), lean loop at teal 65% (uniform), the Llama-3-8B shape of bench_decode.py;
old, new, old again, each compiled afresh.

    python examples/probe_compact_rule_decode.py   (a CUDA GPU; log: examples/results/probe_compact_rule_decode_h100.log)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import build_model, decode_speed, lean  # noqa: E402

import teal_fx  # noqa: E402
from teal_fx.kernels import sparse_gemv as sg  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("probe_compact_rule_decode needs a CUDA GPU")
SPARSITY = 0.65
model = build_model(32)
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (1, 128), device="cuda")
plan = teal_fx.calibrate(model, torch.randint(0, vocab, (2, 256)), sparsity=0.5, method="uniform", num_sequences=2,
                         seq_len=256, progress=False)
teal_fx.attach_plan(model, plan.at(SPARSITY, "uniform"), check=False)
v17 = sg.compact_from
for name, rule in (("v16 rule (0.6 everywhere)", lambda N, K: 0.6), ("v17 rule (compact_from)", v17),
                   ("v16 rule (0.6 everywhere)", lambda N, K: 0.6)):
    sg.compact_from = rule
    torch.compiler.reset()  # the next call compiles and captures afresh: the launch configs are baked in
    t, first = decode_speed(lean(model, ids, "teal", 384), 256)
    print(f"teal {SPARSITY:.0%}, {name}: {t:.1f} tok/s (first call {first:.0f} s)", flush=True)
sg.compact_from = v17
