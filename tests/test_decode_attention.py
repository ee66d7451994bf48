"""``teal::decode_attention``: the Triton kernel against a float64 reference (GQA groups, masks, split merges, every
dtype; output poisoned first), the op's registration, and the rewrite that inserts it (a decode graph computes the
same before and after, for drawn head layouts).

The kernel runs on a GPU when there is one, otherwise under TRITON_INTERPRET=1 on the CPU (set by conftest)."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import teal_fx
from teal_fx.generate import cache_kwarg
from teal_fx.kernels import decode_attention as da
from teal_fx.kernels.reference import reference_decode_attention
from teal_fx.options import TealOptions
from teal_fx.passes import PassContext, replace_decode_attention, run_passes
from teal_fx.passes.analysis.dataflow import is_sdpa
from tests.conftest import ARCHS, count_calls, tiny_model

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL = da.HAS_TRITON and (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
needs_kernel = pytest.mark.skipif(not KERNEL, reason="needs triton on a GPU or TRITON_INTERPRET=1")


def make_inputs(B, H, HKV, L, D, dtype, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, L, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, L, D, generator=g).to(dtype)
    lengths = torch.randint(1, L + 1, (B,), generator=g)  # each row's cache fill: the tail is masked
    prefix = torch.arange(L)[None, :] < lengths[:, None]
    if mask_kind == "bool":
        mask = prefix[:, None, None, :]
    elif mask_kind == "bool_per_head":  # each head its own pattern; position 0 always kept
        mask = torch.rand(B, H, 1, L, generator=g) < 0.6
        mask[..., 0] = True
    elif mask_kind == "float":
        bias = torch.randn(B, 1, 1, L, generator=g) * 0.5
        mask = torch.where(prefix[:, None, None, :], bias, float("-inf")).to(dtype)
    else:
        mask = None
    return [t.to(DEVICE) if t is not None else None for t in (q, k, v, mask)]


def rel_err(out, q, k, v, mask, scale):
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = reference_decode_attention(q.double(), k.double(), v.double(), m64, scale)
    assert not torch.isnan(out).any(), "unwritten output elements"
    return float((out.double() - ref).norm() / ref.norm())


@needs_kernel
@settings(max_examples=25 if ON_GPU else 12, deadline=None)
@given(
    B=st.integers(1, 3), HKV=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4, 8]), L=st.integers(1, 150),
    D=st.sampled_from([16, 24, 64, 128]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from([None, "bool", "bool_per_head", "float"]), seed=st.integers(0, 1000),
    block_l=st.sampled_from([None, 16]), splits=st.integers(1, 5),
)
def test_kernel_matches_float64(B, HKV, G, L, D, dtype, mask_kind, seed, block_l, splits):
    q, k, v, mask = make_inputs(B, HKV * G, HKV, L, D, dtype, mask_kind, seed)
    cfg = None
    if block_l:  # force small blocks and a given number of splits, so merges and wholly masked splits happen
        cfg = da.split_cache(da.launch_config(B, HKV * G, HKV, L, D, q.device), L, splits, block_l)
    out = torch.full((B, HKV * G, 1, D), float("nan"), dtype=dtype, device=DEVICE)  # poison
    scale = 1.0 / math.sqrt(D)
    da.decode_attention_gpu(q, k, v, mask, scale, config=cfg, out=out)
    assert rel_err(out, q, k, v, mask, scale) <= TOL[dtype]


@needs_kernel
def test_counters_are_left_zero_and_launches_repeat():
    q, k, v, mask = make_inputs(2, 8, 2, 96, 32, torch.float32, "bool", 0)
    cfg = da.launch_config(2, 8, 2, 96, 32, q.device)
    cfg = da.split_cache(cfg, 96, 3, block_l=16)  # 3 splits of 32 positions
    assert (cfg.block_l, cfg.l_per_split, cfg.nsplit) == (16, 32, 3)
    first = da.decode_attention_gpu(q, k, v, mask, 0.2, config=cfg)
    second = da.decode_attention_gpu(q, k, v, mask, 0.2, config=cfg)
    torch.testing.assert_close(first, second)
    cnt = da._WORKSPACE.bufs[(q.device, "cnt")]
    assert int(cnt.abs().sum()) == 0


def test_op_registration_opcheck():
    q, k, v, mask = make_inputs(1, 4, 2, 20, 16, torch.float32, "bool", 1)
    torch.library.opcheck(torch.ops.teal.decode_attention.default, (q, k, v, mask, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.teal.decode_attention(q, k, v, None, 0.25)
    ref = reference_decode_attention(q, k, v, None, 0.25)
    torch.testing.assert_close(out, ref)


class _Recorder:
    """A Dynamo backend that keeps the graphs and example inputs it is given (and runs them unchanged)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def decode_graph(model, batch: int = 1, prompt: int = 5):
    """The Dynamo graph of one decode step with a static cache, and inputs to run it with."""
    from teal_fx.generate import static_cache

    cache = static_cache(model, batch, 32)
    rec = _Recorder()
    run = torch.compile(model, backend=rec, dynamic=False)
    ids = torch.randint(3, 100, (batch, prompt))
    with torch.no_grad():
        run(input_ids=ids, **{cache_kwarg(model): cache}, cache_position=torch.arange(prompt), use_cache=True)
        run(input_ids=ids[:, :1], **{cache_kwarg(model): cache}, cache_position=torch.tensor([prompt]), use_cache=True)
    decode = [(gm, ins) for gm, ins in rec.graphs if any(is_sdpa(n) for n in gm.graph.nodes)][-1]
    torch._dynamo.reset()
    return decode


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(a for a in ARCHS if a != "gemma2")),  # gemma2's tiny config runs eager attention
       heads_kv=st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 2)]), batch=st.integers(1, 2),
       seed=st.integers(0, 100))
def test_rewrite_preserves_the_decode_step(arch, heads_kv, batch, seed):
    heads, kv = heads_kv
    model = tiny_model(arch, hidden=64, heads=heads, kv_heads=kv, layers=2, seed=seed)
    gm, inputs = decode_graph(model, batch)
    clone = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]  # the step writes into the cache
    with torch.no_grad():
        before = gm(*inputs)
        after_gm = replace_decode_attention(gm, None)
        assert count_calls(after_gm, torch.ops.teal.decode_attention.default) == 2
        assert not any(is_sdpa(n) for n in after_gm.graph.nodes)
        after = after_gm(*clone)
    for a, b in zip(before, after):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rewrite_drops_the_repeat_kv_copies():
    model = tiny_model("llama", hidden=64, heads=8, kv_heads=2)
    gm, _ = decode_graph(model)
    expands = sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand")
    gm = replace_decode_attention(gm, None)
    # the repeat_kv expansions of K and V (2 per layer) are gone; any other expand (the mask's) stays
    assert sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand") == expands - 4
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.teal.decode_attention.default:
            assert n.args[1].meta["example_value"].shape[1] == 2  # K read with its 2 KV heads


def test_prefill_and_option_off_leave_sdpa():
    model = tiny_model("llama")
    rec = _Recorder()
    with torch.no_grad():
        torch.compile(model, backend=rec)(torch.randint(3, 100, (1, 6)), use_cache=False)
    gm, _ = rec.graphs[-1]
    torch._dynamo.reset()
    n_sdpa = sum(1 for n in gm.graph.nodes if is_sdpa(n))
    assert n_sdpa == 2 and count_calls(replace_decode_attention(gm, None), torch.ops.teal.decode_attention.default) == 0
    # the pass manager runs it only with the option on
    off = run_passes(decode_graph(model)[0], PassContext(options=TealOptions(decode_attention=False)))
    assert count_calls(off, torch.ops.teal.decode_attention.default) == 0
    assert count_calls(run_passes(decode_graph(model)[0], PassContext()), torch.ops.teal.decode_attention.default) == 2


def test_backend_generates_the_same_tokens_with_and_without_it():
    model = tiny_model("qwen2", heads=4, kv_heads=2)
    ids = torch.randint(3, 100, (2, 5))
    ref = teal_fx.generate(model, ids, 10, backend="none", eos_token_id=-1)
    for opt in (True, False):
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="no plan"):
            out = teal_fx.generate(model, ids, 10, backend="teal", eos_token_id=-1,
                                   options={"decode_attention": opt, "compiler": "eager"})
        assert out.tolist() == ref.tolist()
