"""End-to-end decode benchmark on a Llama-3-8B-shaped model (random weights, bf16), one command, one run:

    python examples/bench_decode.py [--new-tokens 256] [--sparsities 0.4,0.5] [--out examples/results/decode_<gpu>.md]
    python examples/bench_decode.py --batches 1,4,8,16 ...   # dense, per-row and shared masks per batch size
    python examples/bench_decode.py --tp 2 -- --shape 8b     # tensor parallel over 2 GPUs (bench_decode_tp.py)

tokens/s of the lean loop (teal_fx.generate, static cache, decode step captured as a CUDA graph through
mode="reduce-overhead") and of Hugging Face generate() (static cache, decode step compiled through the named backend)
with Inductor dense and with the teal backend at each sparsity, batch 1 and 4; thresholds are calibrated on the
model's own activations (uniform). Decode speed = (T(256 new) - T(1 new)) / 255, so the prefill is excluded.
The roofline is ANCHORS.md's 15.01 GB per token scaled by the read bandwidth measured in this run. The table is
rewritten after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import teal_fx

# decode_speed: the same measurement as the kernel table's
from bench_common import add_rule_arguments, apply_rule_arguments, decode_speed, default_out, read_bandwidth
from teal_fx.allocate import block_sparsity
from teal_fx.generate import argmax_disagreements, decode_logits
from teal_fx.inductor import CUDA_INDUCTOR_DEFAULTS
from teal_fx.kernels.reference import sparsify

WEIGHT_BYTES_PER_TOKEN = 15.01e9  # Llama-3-8B bf16: seven block linears 13.96 GB + lm_head 1.05 GB (ANCHORS.md)
BLOCK_BYTES = 13.96e9
# gpt-fast's Inductor setting for decoding: with it Inductor writes a one-row matmul as a Triton reduction and tunes
# its tiles (torch/_inductor/decomposition.py, mm), instead of calling cuBLAS's GEMV
DENSE_TUNED = {"coordinate_descent_tuning": True}


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0)
    torch.manual_seed(0)  # the same random weights in every run, so runs and diagnoses can be compared
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


# the backend's on/off options --ab-option can time side by side (teal_fx/options.py)
AB_OPTIONS = tuple(f.name for f in dataclasses.fields(teal_fx.TealOptions) if isinstance(f.default, bool))
BLOCK_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WeightOnlyInt8(nn.Module):
    """PyTorch's own int8 weight-only linear as gpt-fast and torchao write it: per-channel scales, the product
    ``F.linear(x, w.to(x.dtype)) * scales`` left to Inductor to fuse into one kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scales = w.abs().amax(dim=1).float().clamp_min(1e-12) / 127
        self.register_buffer("weight", (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(w.dtype))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class WeightOnlyInt4(nn.Module):
    """PyTorch's int4 weight-only linear: tinygemm (``aten._weight_int4pack_mm``), asymmetric in groups of 128 along
    K as torchao quantizes for it (w = (q - 8) * scale + zero)."""

    def __init__(self, linear: nn.Linear, group: int = 128, inner_k_tiles: int = 8) -> None:
        super().__init__()
        w = linear.weight.detach()
        N, K = w.shape
        wg = w.float().reshape(N, K // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-6)
        q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        zero = lo + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))
        self.group = group

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group,
                                               self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pytorch_weight_only_(model, fmt: str) -> float:
    """Replace the block linears by PyTorch's own weight-only modules, in place; the first one's relative error
    against its bf16 linear on a random input (a check that the baseline computes the right thing)."""
    cls = WeightOnlyInt8 if fmt == "int8" else WeightOnlyInt4
    err = None
    for mod in list(model.modules()):
        for child in BLOCK_LINEAR_NAMES:
            lin = getattr(mod, child, None)
            if isinstance(lin, nn.Linear):
                new = cls(lin)
                if err is None:
                    x = torch.randn(3, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
                    ref = F.linear(x, lin.weight).float()
                    err = float((new(x).float() - ref).norm() / ref.norm())
                setattr(mod, child, new)
    torch.cuda.empty_cache()
    return err


def lean(model, ids, backend: str, cache_len: int, options=None):
    def run(n):
        return teal_fx.generate(model, ids, n, eos_token_id=-1, backend=backend, mode="reduce-overhead",
                                max_cache_len=cache_len, options=options)
    return run


def hf(model, ids, backend: str, cache_len: int):
    """Hugging Face generate() with a static cache, its decode step compiled through ``backend``."""
    from transformers import CompileConfig

    from teal_fx.generate import cache_kwarg, static_cache

    cache = static_cache(model, ids.shape[0], cache_len)  # one cache object: the CUDA graph keeps its address
    cfg = CompileConfig(backend=backend, mode="reduce-overhead")

    def run(n):
        cache.reset()
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **{cache_kwarg(model): cache},
                              compile_config=cfg, pad_token_id=0)
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sparsities", default="0.5,0.4,0")
    ap.add_argument("--extra-sparsities", default="0.25,0.65", help="lean-loop points measured after HF generate()")
    ap.add_argument("--hf-sparsities", default="0,0.4,0.5")
    ap.add_argument("--sdpa-sparsities", default="0.5",
                    help="lean-loop points with the backend's decode attention off (sdpa, as Inductor dense has it)")
    ap.add_argument("--batch4", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dense-combo", action=argparse.BooleanOptionalAction, default=True,
                    help="also Inductor dense with the Inductor settings the teal backend turns on: how much of "
                         "the gain those settings alone give")
    ap.add_argument("--dense-tuned", action=argparse.BooleanOptionalAction, default=True,
                    help="also Inductor dense with coordinate-descent tuning, gpt-fast's setting: Inductor then "
                         "writes one-row matmuls as Triton reductions and tunes them, instead of calling cuBLAS")
    ap.add_argument("--weights", default="int8,int4",
                    help="quantized formats: PyTorch's own weight-only decoding and teal's at --weight-sparsities")
    ap.add_argument("--weight-sparsities", default="0,0.4,0.5")
    ap.add_argument("--weight-baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="PyTorch's own weight-only decoding before teal's (about 2.5 minutes of compiling)")
    ap.add_argument("--activations", action="store_true",
                    help="each teal int8/int4 row also with its plan's activations='int8' (x rounded to int8 per 32 "
                    "inputs, dp4a products)")
    ap.add_argument("--ab-option", type=_ab_option_list,
                    help="each teal row of batch 1 (bf16, int8, int4) twice, with this backend option False, then "
                         "True (e.g. fold_swiglu, fold_rope): its gain, measured side by side in one process. Several, "
                         "comma-separated: all False, each True alone, then all True")
    ap.add_argument("--quantize-lm-head", nargs="?", const="int8", default=None, choices=["int8", "int4"],
                    help="teal's quantized rows with the output head quantized too: int8 (the flag alone) or int4 "
                         "(calibrate(quantize_lm_head=...))")
    ap.add_argument("--batches", default="",
                    help="batch rows (issue 26): comma-separated batch sizes, each with Inductor dense, teal with one "
                         "mask per row and teal with one mask shared by the batch, at --batch-sparsity")
    ap.add_argument("--batch-sparsity", type=float, default=0.5)
    ap.add_argument("--batch-masks", default="per_row,shared",
                    help="which teal batch rows: per_row, shared or both (each costs a compile of the model)")
    ap.add_argument("--dense1", action=argparse.BooleanOptionalAction, default=True,
                    help="the batch-1 Inductor dense row, the base of every batch-1 row (--no-dense1 with only "
                         "--batches rows saves its compile)")
    ap.add_argument("--out", help="default: examples/results/decode_<gpu>.md (decode_h100.md on an H100)")
    ap.add_argument("--tp", type=int, default=0,
                    help="tensor parallel over this many GPUs: runs examples/bench_decode_tp.py under torchrun with "
                         "the arguments after '--' (default 0: one GPU, this script's rows)")
    add_rule_arguments(ap)
    args, rest = ap.parse_known_args()
    try:
        rule_switches = apply_rule_arguments(args)
    except ValueError as e:
        ap.error(str(e))
    if rule_switches and args.tp:  # the tensor-parallel script runs in other processes, with its own arguments
        ap.error(f"the launch rule's switches ({rule_switches}) apply to this process only: not with --tp")
    if set(args.batch_masks.split(",")) - {"per_row", "shared"}:
        ap.error(f"--batch-masks takes per_row and/or shared, got {args.batch_masks!r}")
    if args.tp:
        tp = Path(__file__).with_name("bench_decode_tp.py")
        extra = rest[1:] if rest[:1] == ["--"] else rest
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.tp}", str(tp), *extra])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 1
    args.out = args.out or default_out("decode")
    torch.manual_seed(0)
    bw = read_bandwidth()
    roof = bw / WEIGHT_BYTES_PER_TOKEN
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e12:.2f} TB/s -> dense roofline {roof:.0f} tok/s", flush=True)
    model = build_model(args.layers)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt), device="cuda")
    ids4 = torch.randint(0, vocab, (4, args.prompt), device="cuda")
    cache_len = args.prompt + args.new_tokens
    rows, notes = [], []
    if rule_switches:
        notes.append(f"launch rule switched for this run: {rule_switches}")
    dense = {}
    fastest = {}  # (path, batch) -> the fastest dense row's tok/s
    out = Path(args.out)

    def add(name, batch, tok_s, first, peak=None, is_dense=False):
        path = "hf" if name.startswith("HF") else "lean"
        base = dense.get("hf" if path == "hf" else batch)
        if is_dense:
            fastest[path, batch] = max(fastest.get((path, batch), 0.0), tok_s)
        # vs dense None (printed '-'): no dense row of that path and batch in this run (--no-dense1)
        rows.append((name, batch, tok_s, first, peak, tok_s / base if base else None, (path, batch)))
        print(rows[-1], flush=True)
        write(out, args, bw, roof, rows, notes, fastest)

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30

    reference = None
    if args.dense1:
        torch.cuda.reset_peak_memory_stats()
        t, first = decode_speed(lean(model, ids, "inductor", cache_len), args.new_tokens)
        dense[1] = t
        add("lean loop, Inductor dense", 1, t, first, peak_gib(), is_dense=True)
    if 0.0 in [float(x) for x in args.sparsities.split(",") if x]:
        dense_tokens = lean(model, ids, "inductor", cache_len)(64)
        # the 0% check's references, while Inductor dense's graphs are still compiled (attaching a plan recompiles)
        reference = ZeroCheck(dense_tokens, args.prompt,
                              decode_logits(model, dense_tokens, args.prompt, backend="inductor",
                                            mode="reduce-overhead", max_cache_len=cache_len)[0],
                              decode_logits(model, dense_tokens, args.prompt, backend="none",
                                            max_cache_len=cache_len)[0])
    if args.dense_tuned:
        torch.cuda.reset_peak_memory_stats()
        t, first = decode_speed(lean(model, ids, "inductor", cache_len, DENSE_TUNED), args.new_tokens)
        add("lean loop, Inductor dense, coordinate-descent tuning (gpt-fast's setting: one-row matmuls as tuned "
            "Triton reductions)", 1, t, first, peak_gib(), is_dense=True)
    if args.dense_combo:
        # no plan attached yet: the teal backend compiles dense, with its Inductor settings (combo_kernels, Inductor's
        # PDL with every kernel waiting first); sdpa kept, as Inductor dense has it
        t, first = decode_speed(lean(model, ids, "teal", cache_len, {"decode_attention": False}), args.new_tokens)
        add("lean loop, dense through the teal backend without a plan (its Inductor settings: "
            f"{', '.join(CUDA_INDUCTOR_DEFAULTS)}, PDL)", 1, t, first, is_dense=True)
    if args.batch4:
        t, first = decode_speed(lean(model, ids4, "inductor", cache_len), args.new_tokens)
        dense[4] = t
        add("lean loop, Inductor dense", 4, t, first, is_dense=True)

    if args.batches:  # before any plan is attached: the weights are row-major, as users have them
        batch_dense_rows(model, [int(b) for b in args.batches.split(",")], args, cache_len, add, dense)
    if args.hf_sparsities:  # before any plan is attached: the weights are still row-major, as users have them
        torch.compiler.reset()
        t, first = decode_speed(hf(model, ids, "inductor", cache_len), args.new_tokens)
        dense["hf"] = t
        add("HF generate(), Inductor dense", 1, t, first, is_dense=True)

    calib = torch.randint(0, vocab, (2, 256))
    plan = None
    if args.sparsities or args.hf_sparsities or args.extra_sparsities or args.sdpa_sparsities:
        plan = teal_fx.calibrate(model, calib, sparsity=0.5, method="uniform", num_sequences=2, seq_len=256,
                                 progress=False)
    lean_teal(model, ids, ids4, plan, args.sparsities, args, cache_len, reference, add, notes, peak_gib)

    if args.hf_sparsities:
        for s in [float(x) for x in args.hf_sparsities.split(",")]:
            teal_fx.attach_plan(model, plan.at(s, "uniform"), check=False)
            torch.compiler.reset()
            t, first = decode_speed(hf(model, ids, "teal", cache_len), args.new_tokens)
            add(f"HF generate(), teal {s:.0%}", 1, t, first)
    if args.extra_sparsities:
        lean_teal(model, ids, ids4, plan, args.extra_sparsities, args, cache_len, reference, add, notes, peak_gib)
    for s in [float(x) for x in args.sdpa_sparsities.split(",") if x]:
        teal_fx.attach_plan(model, plan.at(s, "uniform"), check=False)
        t, first = decode_speed(lean(model, ids, "teal", cache_len, {"decode_attention": False}), args.new_tokens)
        add(f"lean loop, teal {s:.0%}, sdpa attention", 1, t, first)
    if args.batches:
        batch_teal_rows(model, calib, [int(b) for b in args.batches.split(",")], args, cache_len, add, notes)
    del model  # the quantized rows each build their own copy
    for fmt in [f for f in args.weights.split(",") if f]:
        quantized_rows(fmt, args, ids, calib, cache_len, add, notes, peak_gib)
    write(out, args, bw, roof, rows, notes, fastest)  # notes added after the last row
    return 0


def quantized_rows(fmt: str, args, ids, calib, cache_len, add, notes, peak_gib):
    """PyTorch's own ``fmt`` weight-only decoding, then teal's (``calibrate(weights=fmt)``, quantized in place) at
    each of --weight-sparsities, each on a fresh copy of the model."""
    import gc

    if args.weight_baselines:
        gc.collect()
        torch.cuda.empty_cache()
        model = build_model(args.layers)
        err = pytorch_weight_only_(model, fmt)
        torch.cuda.reset_peak_memory_stats()
        t, first = decode_speed(lean(model, ids, "inductor", cache_len, DENSE_TUNED), args.new_tokens)
        what = "gpt-fast/torchao style, per channel" if fmt == "int8" else "tinygemm _weight_int4pack_mm, group 128"
        add(f"lean loop, PyTorch {fmt} weight-only ({what}; Inductor, coordinate-descent tuning)", 1, t, first,
            peak_gib())
        notes.append(f"PyTorch {fmt} weight-only: relative error of its first linear vs bf16 {err:.1e} (a sanity check)")
        del model
    gc.collect()
    torch.cuda.empty_cache()
    model = build_model(args.layers)
    before = torch.cuda.memory_allocated()
    head = args.quantize_lm_head
    plan = teal_fx.calibrate(model, calib, sparsity=0.5, method="uniform", num_sequences=2, seq_len=256,
                             progress=False, weights=fmt, quantize_lm_head=head)
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    notes.append(f"teal {fmt}: quantizing in place took the model's GPU memory from {before / 2**30:.2f} GiB to "
                 f"{after / 2**30:.2f} GiB (block linears {fmt}, embeddings bf16, lm_head {head or 'bf16'})")
    for s in [float(x) for x in args.weight_sparsities.split(",") if x]:
        for activations in [None, "int8"] if args.activations else [None]:
            teal_fx.attach_plan(model, replace(plan.at(s, "uniform"), activations=activations), check=False)
            torch.cuda.reset_peak_memory_stats()
            for options in _ab_variants(args):
                t, first = decode_speed(lean(model, ids, "teal", cache_len, options), args.new_tokens)
                add(f"lean loop, teal {fmt} {s:.0%}{f', lm_head {head}' if head else ''}"
                    f"{', x int8 (dp4a)' if activations else ''}{_ab_label(options)}", 1, t, first, peak_gib())


def batch_dense_rows(model, batches: list[int], args, cache_len, add, dense) -> None:
    """Inductor dense at each batch size, on the row-major weights users have (before any plan is attached)."""
    vocab = model.config.vocab_size
    for b in batches:
        ids = torch.randint(0, vocab, (b, args.prompt), device="cuda")
        t, first = decode_speed(lean(model, ids, "inductor", cache_len), args.new_tokens)
        dense[b] = t
        add("lean loop, Inductor dense", b, t, first, is_dense=True)


def decode_batch_means(model, plan, rows: int, prompt: int, steps: int, shared_mask: bool = False):
    """An eager greedy decode of ``rows`` random prompts with a hook on each block linear of ``plan``: per linear, the
    rows' mean |x| per input channel at every decode step (the shared mask's statistic), and the fraction of
    channels at or below the plan's threshold for ``rows``. ``shared_mask``: the hooks also drop those channels (the
    shared semantics), so each linear sees what a sparse run feeds it."""
    mods = dict(model.named_modules())
    means, dropped, hooks = {}, {}, []

    def hook(key, t):
        def pre(mod, args):
            x = args[0]
            if x.shape[-2] != 1:  # the prefill stays dense
                return None
            m = x.detach().abs().float().mean(dim=0).reshape(-1)
            means.setdefault(key, []).append(m)
            d, n = dropped.get(key, (0, 0))
            dropped[key] = (d + int((m <= t).sum()), n + m.numel())
            return (sparsify(x, t, shared=True), *args[1:]) if shared_mask else None
        return pre

    for key, lp in plan.linears.items():
        hooks.append(mods[key.removesuffix(".weight")].register_forward_pre_hook(hook(key, lp.threshold_for(rows))))
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt), device=dev)
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                           do_sample=False, pad_token_id=0)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in means.items()}, {k: d / n for k, (d, n) in dropped.items()}


def with_decode_thresholds(model, plan, rows: int, prompt: int, steps: int, passes: int = 5):
    """``plan`` with each linear's shared threshold for ``rows`` re-read from decode steps of this model, the steps
    run with the shared masks of the previous pass (the first pass dense).

    Why: in a sparse run each mask shrinks the inputs of the linears after it, and a mean over a batch is narrow, so
    that small shift moves many channels below the threshold (calibrate reads shared thresholds in a sparse run for
    this reason). The random-weight model adds a drift with the position that forwards of its random calibration
    tokens do not show (its attention averages its values almost uniformly, so o's input shrinks as decoding goes
    on): decoding 8 rows under dense-read thresholds dropped ~90% of o's inputs and ~74% of down's (two layers,
    CPU, perf-log v30). Read from masked decode steps, the timed rows run at the plan's sparsity."""

    for i in range(passes):
        means, _ = decode_batch_means(model, plan, rows, prompt, steps, shared_mask=i > 0)
        linears = {}
        for k, lp in plan.linears.items():
            m = means[k].cpu()
            t = float(torch.quantile(m[torch.randperm(m.numel())[: 1 << 24]], lp.sparsity))
            linears[k] = replace(lp, batch_thresholds=tuple(sorted({**dict(lp.batch_thresholds or ()), rows: t}.items())))
        plan = replace(plan, linears=linears, batch_read_at=plan.target_sparsity)
    return plan


def realised_decode_sparsity(model, plan, rows: int, prompt: int, steps: int) -> tuple[float, float, float]:
    """(model-level, least, most) fraction of block-linear inputs a shared ``plan`` drops while decoding ``rows``
    other random prompts (eager, masked as the shared mask masks), the model level weighting each linear by its
    weight's size."""
    _, frac = decode_batch_means(model, plan, rows, prompt, steps, shared_mask=True)
    model_level = block_sparsity(frac, {k: plan.linears[k].numel for k in frac})
    return model_level, min(frac.values()), max(frac.values())


def batch_teal_rows(model, calib, batches: list[int], args, cache_len, add, notes) -> None:
    """Per batch size: teal with per-row masks and with a mask shared by the batch (the same per-linear sparsities;
    the shared plan's thresholds are those of the rows' mean |x| at that batch size, re-read from decode steps:
    ``with_decode_thresholds``)."""

    s = args.batch_sparsity
    per_row = teal_fx.calibrate(model, calib, sparsity=s, method="uniform", num_sequences=2, seq_len=256,
                                progress=False, attach=False)
    shared = replace(per_row, batch_mask="shared")  # its batch thresholds: with_decode_thresholds, per batch size
    vocab = model.config.vocab_size
    masks = args.batch_masks.split(",")
    for b in batches:
        ids = torch.randint(0, vocab, (b, args.prompt), device="cuda")
        for name, p in (("per-row masks", per_row), ("shared mask", shared)):
            if (b == 1 and p is shared) or p.batch_mask not in masks:
                continue  # one row: the same mask
            if p is shared:
                p = with_decode_thresholds(model, shared, b, args.prompt, args.new_tokens)
                got, lo, hi = realised_decode_sparsity(model, p, b, args.prompt, args.new_tokens)
                notes.append(f"shared mask, batch {b}: realised decode sparsity {got:.1%} (per linear {lo:.1%} to "
                             f"{hi:.1%}; eager, other random prompts, thresholds read from decode steps)")
            teal_fx.attach_plan(model, p, check=False)
            t, first = decode_speed(lean(model, ids, "teal", cache_len), args.new_tokens)
            add(f"lean loop, teal {s:.0%}, {name}", b, t, first)
    notes.append("batch rows: per-row masks read the union of the rows' masks (beyond 8 rows, or where the dispatch "
                 "rule says the union cannot win, the masked input goes to cuBLAS); the shared mask drops the inputs "
                 "whose mean |x| over the batch is at or below the plan's threshold for that batch size, read from "
                 "decode steps of the model run under the shared masks (calibrate(batch_mask='shared') reads them "
                 "from masked forwards of the calibration text; the random-weight model's inputs to o shrink with "
                 "the position, which decode steps see: docs/perf-log.md v30-v31)")


def _ab_option_list(text: str) -> list[str]:
    """--ab-option's comma-separated names, each one of the backend's on/off options (``AB_OPTIONS``)."""
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in AB_OPTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--ab-option takes the backend's on/off options {AB_OPTIONS}, got {bad or text!r}")
    return names


def _ab_variants(args) -> list[Optional[dict]]:
    """--ab-option's rows: the backend's defaults ([None]); one option False then True; several all False, each True
    alone, then all True."""
    names = args.ab_option
    if not names:
        return [None]
    rows = [dict.fromkeys(names, False)]
    if len(names) > 1:
        rows += [{**dict.fromkeys(names, False), n: True} for n in names]
    return rows + [dict.fromkeys(names, True)]


def _ab_label(options: Optional[dict]) -> str:
    return "" if options is None else ", " + ", ".join(f"{k}={v}" for k, v in options.items())


def lean_teal(model, ids, ids4, plan, sparsities: str, args, cache_len, reference, add, notes, peak_gib) -> None:
    for s in [float(x) for x in sparsities.split(",") if x]:
        teal_fx.attach_plan(model, plan.at(s, "uniform"), check=False)  # resets torch.compile caches
        torch.cuda.reset_peak_memory_stats()
        for options in _ab_variants(args):
            t, first = decode_speed(lean(model, ids, "teal", cache_len, options), args.new_tokens)
            add(f"lean loop, teal {s:.0%}{_ab_label(options)}", 1, t, first, peak_gib())
        if s == 0.0 and reference is not None:
            notes.append(reference.report(model, ids, cache_len))
        if s == 0.5 and args.batch4:
            t, first = decode_speed(lean(model, ids4, "teal", cache_len), args.new_tokens)
            add(f"lean loop, teal {s:.0%}", 4, t, first)


@dataclass
class ZeroCheck:
    """Teal at 0% against Inductor dense: "the same greedy tokens up to bf16 ties".

    Free-running, two bf16 implementations part at the first near-tie and then see different contexts, so the
    check also feeds both the dense run's tokens (``decode_logits``) and compares step by step. A step where teal
    picks another token (fed dense's tokens, or at the free-running runs' first difference, where both still saw
    the same context) counts as a tie when the two tokens' gap in dense's logits is within how far Inductor dense's
    own logits are from the eager bf16 model's at that step: another valid bf16 computation of the same model could
    rank them either way."""

    tokens: torch.Tensor  # Inductor dense's 64 greedy tokens after the prompt
    prompt: int
    dense: torch.Tensor  # [64, V] Inductor dense's logits, fed ``tokens``
    eager: torch.Tensor  # the same from the eager bf16 model

    def report(self, model, ids, cache_len: int) -> str:
        got = lean(model, ids, "teal", cache_len)(64)
        same = (got == self.tokens).all(dim=0)
        teal = decode_logits(model, self.tokens, self.prompt, backend="teal", mode="reduce-overhead",
                             max_cache_len=cache_len)[0]
        noise = (self.dense - self.eager).abs().amax(dim=-1)  # per step
        free, free_tie = "identical", True
        if not bool(same.all()):  # up to here both saw the same context, so the teacher-forced rows are theirs
            d = int((~same).nonzero()[0]) - self.prompt
            a, b = int(self.tokens[0, self.prompt + d]), int(got[0, self.prompt + d])
            gap = float(self.dense[d, a] - self.dense[d, b])
            free_tie = gap <= float(noise[d])
            free = (f"first difference at generated token {d}; there dense's logits put dense's token "
                    f"{gap:+.4f} above teal's (dense-eager {float(noise[d]):.4f}), and teal's logits, recomputed "
                    f"on the same context, put teal's token {float(teal[d, b] - teal[d, a]):+.4f} above dense's")
        apart = (teal - self.dense).abs().amax(dim=-1)
        steps = argmax_disagreements(self.dense, teal)
        ties = [gap <= float(noise[i]) for i, _, _, gap in steps]
        where = "; ".join(f"step {i}: gap {gap:.4f} vs dense-eager {float(noise[i]):.4f}" for i, _, _, gap in steps)
        beyond = len(ties) - sum(ties) + (not free_tie)
        verdict = ("same tokens up to bf16 ties: yes" if not beyond else
                   f"same tokens up to bf16 ties: NO ({beyond} difference(s) beyond the noise)")
        return (f"teal 0% vs Inductor dense, 64 greedy tokens (lean loop): {free}. Fed dense's tokens, teal picks "
                f"another token at {len(steps)} of {len(teal)} steps{' (' + where + ')' if steps else ''}; largest "
                f"logit difference teal vs Inductor dense {float(apart.max()):.4f} (median over steps "
                f"{float(apart.median()):.4f}), Inductor dense vs eager bf16 {float(noise.max()):.4f} (median "
                f"{float(noise.median()):.4f}); {verdict}")


def _swiglu_where() -> str:
    """Where the backend's defaults form silu(gate) * up (the results' header says what the teal rows ran)."""
    if teal_fx.TealOptions().fold_swiglu:
        return "each down program from the gate/up launch's sums (fold_swiglu)"
    return "the gate/up launch"


def _qkv_finish_where() -> str:
    """Where the backend's defaults form q (RoPE) and the new k/v cache row."""
    if teal_fx.TealOptions().fold_qkv_attention:
        return "each attention program from the q/k/v launch's sums (fold_qkv_attention)"
    return "the q/k/v launch"


def _merge_where() -> str:
    """Where the backend's defaults merge the decode attention's cache splits."""
    if teal_fx.TealOptions().fold_attention_merge:
        return "each o program as it forms its inputs (fold_attention_merge)"
    return "the attention launch's last program of each KV head"


def write(out: Path, args, bw: float, roof: float, rows: list, notes: list, fastest: dict) -> None:
    lines = [
        "# End-to-end decode: Llama-3-8B shape (random weights, bf16)",
        "",
        f"- date {datetime.date.today()}; {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {__import__('triton').__version__}; transformers {__import__('transformers').__version__}",
        f"- prompt {args.prompt} tokens, {args.new_tokens} new tokens; decode tok/s = (n-1) / (T(n) - T(1)), best of 2 "
        "(prefill excluded); per sequence: a batch-4 row's tok/s counts each sequence's tokens once; the lean loop "
        "picks the greedy token inside the compiled step (teal_fx.generate's greedy_step), dense and teal alike",
        f"- read bandwidth in this run {bw / 1e12:.2f} TB/s; dense roofline {roof:.0f} tok/s "
        f"({WEIGHT_BYTES_PER_TOKEN / 1e9:.2f} GB/token, ANCHORS.md scaled to this bandwidth)",
        "- thresholds: uniform, calibrated on the model's own activations (2 x 256 random-token sequences); "
        "teal = q/k/v and gate/up grouped (4 sparse launches per block, silu(gate) * up formed by "
        f"{_swiglu_where()}, the residual add and the next RMSNorm by the o and down launches, RoPE and the cache "
        f"writes by {_qkv_finish_where()}, the attention's cache splits merged by {_merge_where()}), the decode "
        "step's attention as "
        "teal::decode_attention (rows marked 'sdpa attention' keep sdpa, as "
        "Inductor dense does), the cache counters' increments as one launch, programmatic dependent launches "
        "of teal's kernels and of Inductor's (each Inductor kernel waiting before its first access: docs/design.md, "
        "'Launch boundaries'), and "
        "Inductor's combo_kernels (a dense row shows these Inductor settings alone)",
        "- 'vs dense' compares with the Inductor dense row (default settings) of the same path and batch (lean loop or "
        "HF generate()); 'vs fastest dense' with the fastest dense row of the same path and batch measured in this run",
        "",
        "| path | batch | tok/s per sequence | aggregate tok/s | ms/token | vs dense | vs fastest dense | "
        "share of dense roofline | first call incl. compile (s) | peak GPU memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b, t, first, peak, ratio, key in rows:
        best = fastest.get(key)
        vs = "-" if ratio is None else f"{ratio:.2f}"
        vs_best = f"{t / best:.2f}" if best else "-"
        lines.append(f"| {name} | {b} | {t:.1f} | {t * b:.1f} | {1000 / t:.2f} | {vs} | {vs_best} | "
                     f"{t / roof:.2f} | {first:.0f} | {'' if peak is None else f'{peak:.2f}'} |")
    lines += [""] + [f"- {n}" for n in notes] + ["", f"Command: `{shlex.join(['python', 'examples/bench_decode.py', *sys.argv[1:]])}`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
