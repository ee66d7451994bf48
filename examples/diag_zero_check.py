"""Diagnosis (H100): why teal 0%'s free-running first token differed from Inductor dense's in bench_decode.

Teal 0% generates the same 12 tokens fresh, after warm calls, after teacher forcing and without CUDA graphs, and each
is compared with its own teacher-forced choice. With Inductor's PDL on the runs disagreed from token 0 (NOTES.md v12,
diag_zero_check_h100.log); without it they agree up to atomic-order ties (v13, diag_zero_check_h100_v13.log), and
so they do with Inductor's PDL made to wait before every kernel's first access (v14, diag_zero_check_h100_v14.log).

    python examples/diag_zero_check.py      (a CUDA GPU, ~8 minutes: the 32-layer 8B shape)
"""
import sys

import torch

import teal_fx
from teal_fx.generate import decode_logits

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import build_model, decode_speed, lean  # noqa: E402

m = build_model(32)
torch.manual_seed(0)
ids = torch.randint(0, m.config.vocab_size, (1, 128), device="cuda")
cl = 384
kw = dict(eos_token_id=-1, mode="reduce-overhead", max_cache_len=cl)
d = teal_fx.generate(m, ids, 12, backend="inductor", **kw)
print("dense free      ", d[0, 128:].tolist(), flush=True)
dense_tf = decode_logits(m, d, 128, backend="inductor", mode="reduce-overhead", max_cache_len=cl)[0]
print("dense tf argmax ", dense_tf.argmax(-1).tolist())
teal_fx.attach_plan(m, teal_fx.Plan.from_thresholds(teal_fx.find_linears(m), 0.0), check=False)
t = teal_fx.generate(m, ids, 12, backend="teal", **kw)
print("teal free fresh ", t[0, 128:].tolist(), flush=True)
print("tok/s", decode_speed(lean(m, ids, "teal", cl), 256)[0], flush=True)
for k in range(2):
    t = teal_fx.generate(m, ids, 12, backend="teal", **kw)
    print("teal free after ", k, t[0, 128:].tolist(), flush=True)
lt = decode_logits(m, d, 128, backend="teal", mode="reduce-overhead", max_cache_len=cl)[0]
print("teal tf argmax  ", lt.argmax(-1).tolist(), flush=True)
t = teal_fx.generate(m, ids, 12, backend="teal", **kw)
print("teal free again ", t[0, 128:].tolist(), flush=True)
t = teal_fx.generate(m, ids, 12, backend="teal", eos_token_id=-1, max_cache_len=cl)
print("teal no graphs  ", t[0, 128:].tolist(), flush=True)
