"""GPU-only checks (skipped on CPU): the op runs the Triton kernel inside compiled graphs and CUDA graphs, weights
become column-major in place, the lean loop works with mode="reduce-overhead"."""
from dataclasses import replace

import pytest
import torch

import teal_fx
from teal_fx.kernels.reference import reference_decode_attention, reference_sparse_linear
from teal_fx.kernels.sparse_gemv_config import choose_config
from tests.conftest import masked_inputs, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(x, w, b, t):
    """The op's reference in float64."""
    return reference_sparse_linear(x.double(), w.double(), None if b is None else b.double(), t)


def _plan(model, t=0.4):
    return teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), t)


def test_attach_makes_weights_column_major_in_place():
    model = tiny_model("llama", hidden=128, inter=256).cuda()
    with torch.no_grad():  # cuBLAS allocates its workspace on first use: not the conversion's doing
        model(torch.tensor([[3, 4]], device="cuda"), use_cache=False)
    before = torch.cuda.memory_allocated()
    ids = {id(p) for p in model.parameters()}
    teal_fx.attach_plan(model, _plan(model))
    assert {id(p) for p in model.parameters()} == ids  # same Parameter objects
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.stride() == (1, w.shape[0])
    assert model.lm_head.weight.stride() == (model.lm_head.weight.shape[1], 1)  # lm_head untouched
    assert torch.cuda.memory_allocated() <= before * 1.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_step_matches_reference(dtype):
    model = tiny_model("qwen2", hidden=128, heads=4, kv_heads=2, inter=256, dtype=dtype).cuda()
    plan = _plan(model, 0.3)
    teal_fx.attach_plan(model, plan)
    compiled = torch.compile(model, backend="teal", mode="reduce-overhead")
    ids = torch.randint(3, 128, (2, 1), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(ids, use_cache=False).logits.clone()
        with masked_inputs(model, plan):
            ref = model(ids, use_cache=False).logits
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_generate_reduce_overhead_equals_reference():
    model = tiny_model("llama", hidden=128, inter=256).cuda()
    plan = _plan(model, 0.3)
    teal_fx.attach_plan(model, plan)
    ids = torch.randint(3, 128, (2, 5), device="cuda")
    out = teal_fx.generate(model, ids, 12, mode="reduce-overhead", eos_token_id=-1)
    with masked_inputs(model, plan, sparse_from=1.0):
        ref = teal_fx.generate(model, ids, 12, backend="none", eos_token_id=-1)
    assert torch.equal(out, ref)


def test_decode_logits_in_cuda_graphs_keep_every_step():
    """Teacher-forced logits through CUDA graphs: each step's row is copied before the next replay overwrites it."""
    from teal_fx.generate import decode_logits

    model = tiny_model("llama", hidden=128, inter=256).cuda()
    teal_fx.attach_plan(model, _plan(model, 0.3))
    tokens = torch.randint(3, 128, (2, 14), device="cuda")
    graphs = decode_logits(model, tokens, 5, mode="reduce-overhead")
    plain = decode_logits(model, tokens, 5)
    assert graphs.shape == (2, 9, 128)
    assert (graphs[:, 1:] - graphs[:, :-1]).abs().amax() > 1e-3  # rows differ: not one buffer seen nine times
    torch.testing.assert_close(graphs, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pdl", [True, False])  # programmatic dependent launch (kernels/pdl.py) or plain launches
@pytest.mark.parametrize("back_to_back", [False, True])  # an eager clamp between the launches, or none
@pytest.mark.parametrize("sparsity_hint", [None, 0.7])  # the masked and the packed loop
def test_dependent_launches_in_a_cuda_graph(sparsity_hint, back_to_back, pdl, monkeypatch):
    """Inside one CUDA graph, each launch reads what the previous one wrote: its input, and the shared workspace and
    counters, which the previous launch must leave zero. Back to back, with PDL, a launch starts while the one before
    finishes, so its reads must wait. Values are small integers, exact whatever the order of the sums (fp16 clamped,
    fp32 unclamped), so the graph must match the reference exactly."""
    from teal_fx.kernels import pdl as pdl_mod
    from teal_fx.kernels import sparse_gemv as sg

    monkeypatch.setenv("TEAL_PDL", "1" if pdl else "0")
    assert pdl_mod.enabled(torch.device("cuda")) == (pdl and torch.cuda.get_device_capability()[0] >= 9)
    dtype = torch.float32 if back_to_back else torch.half
    g = torch.Generator(device="cpu").manual_seed(0)
    n = 4096  # 16 x 64 programs per launch; 8 launches
    weights = []
    for _ in range(8):
        w = (torch.rand(n, n, generator=g) < 2e-3).to(dtype) * (torch.randint(0, 2, (n, n), generator=g).to(dtype) * 2 - 1)
        weights.append(w.cuda().t().contiguous().t())  # column-major
    x_static = torch.zeros(1, n, dtype=dtype, device="cuda")

    def chain(x, launch):
        for w in weights:
            x = launch(x, w) if back_to_back else launch(x, w).clamp(-8, 8)
        return x

    kernel = lambda x, w: sg.sparse_gemv(x, w, None, 0.5, sparsity=sparsity_hint)  # noqa: E731
    reference = lambda x, w: (torch.where(x.abs() > 0.5, x, 0).double() @ w.double().t()).to(dtype)  # noqa: E731
    chain(x_static, kernel)  # compile and reserve the workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = chain(x_static, kernel)
    for seed in range(3):
        x_static.copy_(torch.randint(-3, 4, (1, n), generator=g.manual_seed(seed)).to(dtype))
        graph.replay()
        expected = chain(x_static.clone(), reference)
        assert expected.abs().max() < 2**24  # still exact in fp32
        assert torch.equal(y_static, expected)
        assert y_static.abs().sum() > 0  # the chain did not die out


@pytest.mark.parametrize("pdl", [True, False])
def test_add_rmsnorm_finish_reads_a_residual_from_two_launches_back(pdl, monkeypatch):
    """The add + RMSNorm finish reads its residual before its PDL wait (kernels/pdl.py: two launches back has completed
    when a kernel starts). In a decode step that residual is the previous finish's h, written two launches earlier, as
    here: h_{i+1} = h_i + W_i x_i in one CUDA graph, 8 times over, back to back. Small integers keep every sum exact
    (fp32), so h must match exactly and the normalised rows closely, replay after replay."""
    from teal_fx.kernels import sparse_gemv as sg

    monkeypatch.setenv("TEAL_PDL", "1" if pdl else "0")
    g = torch.Generator(device="cpu").manual_seed(0)
    n = 4096
    weights = [((torch.rand(n, n, generator=g) < 2e-3).float() * (torch.randint(0, 2, (n, n), generator=g) * 2 - 1))
               .cuda().t().contiguous().t() for _ in range(8)]
    xs = [torch.randint(-3, 4, (1, n), generator=g).float().cuda() for _ in weights]
    norm_w = torch.rand(n, generator=g).cuda() + 0.5
    h_static = torch.zeros(1, n, device="cuda")

    def chain(h):
        out = None
        for w, x in zip(weights, xs):
            h, out = sg.sparse_gemv_add_rmsnorm(x, w, None, 0.5, h, norm_w, 1e-6)
        return h, out

    chain(h_static)  # compile and reserve the workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out, n_out = chain(h_static)
    for seed in range(3):
        h_static.copy_(torch.randint(-50, 50, (1, n), generator=g.manual_seed(seed)).float())
        graph.replay()
        h = h_static.double()
        for w, x in zip(weights, xs):
            h = h + torch.where(x.abs() > 0.5, x, 0).double() @ w.double().t()
        expected = norm_w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert torch.equal(h_out.double(), h)
        torch.testing.assert_close(n_out.double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_is_deterministic_and_self_consistent_through_cuda_graphs():
    """Repeated greedy generations through the backend's CUDA graphs (after warm calls, as a benchmark makes them) give
    the same tokens, and each token is the argmax of the same path's logits fed those tokens. With Inductor's PDL as
    it comes, the 32-layer 8B shape broke both (tokens changed between identical calls; docs/design.md, "Launch boundaries"); the backend's
    Inductor PDL (every kernel waiting first) is on here. The split-K sums' atomic order still varies,
    so a near-tie could in principle flip a token (docs/design.md, "Determinism")."""
    from teal_fx.generate import decode_logits

    model = tiny_model("llama", layers=8, hidden=512, heads=8, kv_heads=2, inter=1024, vocab=512).cuda()
    teal_fx.attach_plan(model, _plan(model, 0.3))
    ids = torch.randint(3, 512, (1, 24), device="cuda")
    kw = dict(eos_token_id=-1, mode="reduce-overhead", max_cache_len=256)
    for n in (4, 1, 1, 64, 64):  # warm-up, recording and replays of both graphs
        teal_fx.generate(model, ids, n, **kw)
    runs = [teal_fx.generate(model, ids, 32, **kw) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    chosen = decode_logits(model, runs[0], 24, mode="reduce-overhead", max_cache_len=256).argmax(-1)
    assert torch.equal(chosen, runs[0][:, 24:])


def test_decode_attention_in_a_cuda_graph():
    """Replays of one captured launch follow a mask that changes between replays (the cache fills up); the split
    merge's counters are left zero by each replay."""
    from teal_fx.kernels import decode_attention as da

    B, H, HKV, L, D = 1, 32, 8, 512, 128
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device="cuda")
    da.reserve_workspace("cuda", B, H, HKV, L, D)
    assert da.launch_config(B, H, HKV, L, D, q.device).nsplit > 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mask[..., 0] = True
        torch.ops.teal.decode_attention(q, k, v, mask, 0.1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.teal.decode_attention(q, k, v, mask, 0.1)
    for fill in (1, 63, 64, 300, 512):
        mask.copy_((torch.arange(L, device="cuda") < fill)[None, None, None, :])
        g.replay()
        ref = reference_decode_attention(q.double(), k.double(), v.double(), mask, 0.1)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    assert int(da._WORKSPACE.bufs[(q.device, "cnt")].abs().sum()) == 0


def test_generate_stops_on_gpu_without_waiting_each_check():
    """On CUDA the "all rows stopped?" flag is read after an event (no wait); the result is the same as stopping at
    the first EOS: the extra steps are trimmed."""
    model = tiny_model("llama", hidden=128, inter=256).cuda()
    ids = torch.randint(3, 128, (1, 4), device="cuda")
    greedy = teal_fx.generate(model, ids, 40, backend="none", eos_token_id=-1)
    stop = int(greedy[0, 6])  # the third new token
    out = teal_fx.generate(model, ids, 40, backend="none", eos_token_id=stop)
    first = int((greedy[0, 4:] == stop).nonzero()[0]) + 4
    assert torch.equal(out, greedy[:, : first + 1])


def test_padded_batch_decodes_in_cuda_graphs_like_its_masked_reference():
    """A left-padded batch's greedy step under CUDA graphs: its attention mask and position ids are the step's own
    buffers, copied in once a call and advanced inside the graph (generate.py, ``_StepBuffers``). Two calls with
    different padding reuse the same buffers and graph; each equals the eager model with masked inputs."""
    from tests.test_padded_batches import left_pad

    model = tiny_model("llama", hidden=128, inter=256).cuda()
    plan = _plan(model, 0.3)
    teal_fx.attach_plan(model, plan)
    for prompts in ([[5, 17, 33, 9, 41, 7], [22, 8, 61], [90, 14, 3, 77]],
                    [[7, 8], [9, 10, 11, 12, 13, 14], [15, 16, 17]]):
        ids, mask = (t.cuda() for t in left_pad(prompts, 6))
        out = teal_fx.generate(model, ids, 12, mode="reduce-overhead", eos_token_id=-1, attention_mask=mask)
        with masked_inputs(model, plan, sparse_from=1.0):
            ref = teal_fx.generate(model, ids, 12, backend="none", eos_token_id=-1, attention_mask=mask)
        assert torch.equal(out, ref), prompts


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_swiglu_op_runs_the_fused_launch_and_matches_its_expression(rows):
    from teal_fx.kernels import sparse_gemv as sg

    x = torch.randn(rows, 1, 512, device="cuda", dtype=torch.bfloat16)
    wg, wu = ((torch.randn(1024, 512, device="cuda") / 512**0.5).bfloat16().t().contiguous().t() for _ in range(2))
    assert sg.can_fuse_swiglu(x, wg, wu)
    got = torch.ops.teal.sparse_swiglu(x, wg, wu, 0.6, 0.4, 1.0, [-1.0, -1.0])  # unknown sparsity: the kernel
    gate = _reference(x.reshape(rows, -1).cpu(), wg.cpu(), None, 0.6)
    want = torch.nn.functional.silu(gate) * _reference(x.reshape(rows, -1).cpu(), wu.cpu(), None, 0.4)
    err = (got.reshape(rows, -1).cpu().double() - want).norm() / want.norm()
    assert err < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,hint", [(14336, 4096, 0.5), (14336, 4096, 0.7), (4096, 4096, 0.5), (1024, 4096, 0.5)])
@pytest.mark.parametrize("apart", [False, True])
def test_both_split_k_epilogues_on_the_default_configs(N, K, hint, dtype, apart):
    """The 8B shapes' one-row configs (masked 256-column, packed 1024-column, [BK, BN] tiles) with the split-K sums
    finished in the grid or by the second launch: a miscompile of the second launch's 4-warp bf16 tiles (Triton 3.6)
    only showed on the GPU, never in the interpreter."""
    from teal_fx.kernels import sparse_gemv as sg

    g = torch.Generator(device="cpu").manual_seed(N + K)
    x = torch.randn(1, K, generator=g).to(dtype).cuda()
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).cuda().t().contiguous().t()
    t = float(torch.quantile(x.float().abs().flatten().cpu(), hint))
    cfg = replace(choose_config(1, N, K, hint), apart=apart)
    assert cfg.split_k > 1
    ref = _reference(x.cpu(), w.cpu(), None, t)
    for _ in range(2):  # the workspace must be left zero
        y = torch.full((1, N), float("nan"), dtype=dtype, device="cuda")
        sg.sparse_gemv(x, w, None, t, config=cfg, out=y)
        assert not torch.isnan(y).any()
        assert float((y.cpu().double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,rows", [(4096, 4096, 1), (4096, 14336, 1), (4096, 14336, 4), (4096, 4096, 6),
                                      (3000, 1000, 1)])
def test_add_rmsnorm_op_on_the_8b_shapes(N, K, rows, dtype):
    """The o / down shapes with their add + RMSNorm finish (one program of 4096 columns, 4 warps: the width where
    the plain finishing launch's 4-warp tiles once miscompiled) against the eager expression on float64 sums."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.reference import reference_rmsnorm

    g = torch.Generator(device="cpu").manual_seed(N + K + rows)
    x = torch.randn(rows, 1, K, generator=g).to(dtype).cuda()
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).cuda().t().contiguous().t()
    res = torch.randn(rows, 1, N, generator=g).to(dtype).cuda()
    nw = (1 + torch.randn(N, generator=g) / 4).to(dtype).cuda()
    t = float(torch.quantile(x.float().abs().flatten().cpu(), 0.5))
    assert sg.supports(x, w) and sg.can_fuse_add_rmsnorm(x, w, res, nw)
    y = _reference(x.reshape(rows, K).cpu(), w.cpu(), None, t).to(dtype).reshape(rows, 1, N)
    h_ref = res.cpu() + y
    out_ref = reference_rmsnorm(h_ref, nw.cpu(), 1e-5)
    for _ in range(2):  # the workspace must be left zero
        h, out = torch.ops.teal.sparse_linear_add_rmsnorm(x, w, None, t, 1.0, -1.0, res, nw, 1e-5)  # the kernel
        for got, want in ((h, h_ref), (out, out_ref)):
            assert got.shape == want.shape and not torch.isnan(got).any()
            assert float((got.cpu().double() - want.double()).norm() / want.double().norm()) < 1e-2


def test_deterministic_algorithms_run_the_reference_instead_of_the_kernel(monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the ops never launch the sparse GEMV (fp32 atomics in a
    varying order) and give their reference's result bit for bit, with one warning; turned off, they launch it."""
    from teal_fx.kernels import sparse_gemv as sg

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for determinism
    monkeypatch.setattr(sg, "_warned_deterministic", False)
    launches = []
    launch = sg.sparse_gemv_group
    monkeypatch.setattr(sg, "sparse_gemv_group", lambda *a, **k: launches.append(1) or launch(*a, **k))
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    wg, wu = ((torch.randn(2048, 1024, device="cuda") / 32).bfloat16().t().contiguous().t() for _ in range(2))
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(UserWarning, match="deterministic"):
            y = torch.ops.teal.sparse_linear(x, wg, None, 0.7)
        assert torch.equal(y, reference_sparse_linear(x, wg, None, 0.7))
        got = torch.ops.teal.sparse_swiglu(x, wg, wu, 0.7, 0.5, 1.0, [0.5, 0.4])
        want = torch.nn.functional.silu(reference_sparse_linear(x, wg, None, 0.7)) * \
            reference_sparse_linear(x, wu, None, 0.5)
        assert torch.equal(got, want)
        assert not launches
    finally:
        torch.use_deterministic_algorithms(False)
    torch.ops.teal.sparse_linear(x, wg, None, 0.7)
    assert launches


def test_inductor_kernels_wait_before_their_first_access_next_to_the_teal_ops():
    """With the backend's Inductor PDL (option inductor_pdl, on by default on sm_90+), every Triton kernel Inductor
    generates for a decode step launches early (launch_pdl) and waits before its first load or store, so none can
    read a teal op's output before the op's last kernel has stored it (docs/design.md, "Launch boundaries")."""
    import re

    from torch._inductor.utils import run_and_get_code

    from teal_fx.kernels import pdl

    if not pdl.enabled(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+")
    torch.compiler.reset()
    model = tiny_model("llama", layers=2, hidden=256, heads=4, kv_heads=2, inter=512, vocab=256).cuda()
    teal_fx.attach_plan(model, _plan(model, 0.4))
    ids = torch.randint(3, 256, (1, 8), device="cuda")
    _, codes = run_and_get_code(lambda: teal_fx.generate(model, ids, 4, eos_token_id=-1, max_cache_len=64))
    kernels = [k for code in codes for k in re.findall(r"async_compile\.triton\((.*?)'''\s*,\s*device_str", code, re.S)]
    accessing = [k for k in kernels if "tl.load(" in k or "tl.store(" in k]
    assert accessing, "no Inductor Triton kernel generated"
    for k in accessing:
        first = min(i for i in (k.find("tl.load("), k.find("tl.store(")) if i >= 0)
        assert 0 <= k.find("gdc_wait()") < first, k
        assert "'launch_pdl': True" in k, k
    assert any("teal.sparse" in code or "teal::sparse" in code or "sparse_linear" in code for code in codes)


def test_decode_step_on_gpu_forms_cos_sin_mask_and_positions_once():
    """On the GPU's torch too (2.11 on the lent machines, where without the ops' ANY_STRIDES tag Inductor gave each
    layer's attention op its own copies of cos, sin and the mask, in small launches inside the step's chain):
    every layer takes the one cos, sin and mask and a view of its cache counter, and the step's Inductor kernels do
    not grow with the layers (docs/perf-log.md v62)."""
    from tests.conftest import assert_shared_inputs, decode_step_attention_inputs

    kernels = {}
    for layers in (2, 4):
        model = tiny_model("llama", layers=layers, hidden=256, heads=4, kv_heads=2, inter=512, vocab=256).cuda()
        teal_fx.attach_plan(model, _plan(model, 0.4))
        ids = torch.randint(3, 256, (1, 8), device="cuda")
        per_layer, kernels[layers] = decode_step_attention_inputs(model, ids)
        assert len(per_layer) == layers
        assert_shared_inputs(per_layer)
    assert kernels[2] == kernels[4], kernels


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_decodes_in_cuda_graphs_like_its_masked_reference(fmt):
    """calibrate(weights=fmt) on the GPU: the memory falls, the lean loop (CUDA graphs, the quantized sparse ops and
    the dequantizing GEMM of the prefill) generates, and fed its own tokens gives the logits of the eager quantized
    model with masked inputs at every step."""
    model = tiny_model("llama", hidden=256, inter=512, dtype=torch.float32).cuda()
    weight_bytes = lambda: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    before = weight_bytes()
    data = torch.randint(3, 128, (4, 64))
    plan = teal_fx.calibrate(model, data, sparsity=0.4, weights=fmt, progress=False, num_sequences=4, seq_len=64)
    # the model's bytes, not the allocator's: the GEMV's scratch (tens of MB, reserved at compile) outweighs this
    # 2.5 MB model; that no float copy survives is tests/test_quantized_model.py's weak-reference check
    assert weight_bytes() < before
    q = model.model.layers[0].mlp.up_proj
    assert q.weight.is_cuda and q.weight.t().is_contiguous()
    ids = torch.randint(3, 128, (2, 20), device="cuda")  # a 20-token prefill: the dequantizing GEMM
    out = teal_fx.generate(model, ids, 10, mode="reduce-overhead", eos_token_id=-1)
    assert out.shape == (2, 30)
    # fed the same tokens (teacher forcing), the logits of every step agree. In fp32: in bf16 the two paths' roundings
    # flip near-threshold inputs, which compounds through the cache (11% apart on the H200, as the shared plan's test
    # below found for its masks)
    from teal_fx.generate import decode_logits

    got = decode_logits(model, out, 20, mode="reduce-overhead")
    with masked_inputs(model, plan, sparse_from=1.0):
        ref = decode_logits(model, out, 20, backend="none")
    err = float((got - ref).norm() / ref.norm())
    assert err < 1e-3, err


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_quantized_sparse_ops_on_the_8b_shapes(fmt, rows):
    """The default configs on Llama-3-8B's gate/up and down shapes, against the float64 dequantized reference."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.quantize import dequantize, quantize_int4, quantize_int8

    quantize = quantize_int8 if fmt == "int8" else quantize_int4
    for N, K in [(14336, 4096), (4096, 14336), (1024, 4096)]:
        q, s = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5)
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        t = float(x.float().abs().quantile(0.5))
        y = sg.sparse_gemv(x, q, None, t, sparsity=0.5, scales=s)
        ref = reference_sparse_linear(x.double(), dequantize(q, s, torch.float64), None, t)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_quantized_fused_launches_on_the_8b_shapes(fmt, sparsity):
    """One row through the backend's MLP launches on Llama-3-8B's shapes, the rule's configs (int4 packs gate+up from
    30% and down from 45%): gate+up with silu(gate) * up, down with the residual add and RMSNorm, against float64."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.quantize import dequantize, quantize_int4, quantize_int8
    from teal_fx.kernels.reference import reference_rmsnorm, reference_swiglu

    quantize = quantize_int8 if fmt == "int8" else quantize_int4
    g = torch.Generator(device="cuda").manual_seed(int(sparsity * 10))
    w = lambda N, K: quantize(torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K**0.5)  # noqa: E731
    (qg, s_gate), (qu, s_up), (qd, s_down) = w(14336, 4096), w(14336, 4096), w(4096, 14336)
    x = torch.randn(1, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    t = float(x.float().abs().quantile(sparsity))
    y = sg.sparse_gemv_swiglu(x, qg, qu, t, t, sparsity=sparsity, scales_gate=s_gate, scales_up=s_up)
    ref = reference_swiglu(x.double(), dequantize(qg, s_gate, torch.float64), dequantize(qu, s_up, torch.float64), t, t)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    xd = torch.randn(1, 14336, device="cuda", generator=g, dtype=torch.bfloat16)
    td = float(xd.float().abs().quantile(sparsity))
    res, nw = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16), torch.rand(4096, device="cuda").bfloat16()
    h, out = sg.sparse_gemv_add_rmsnorm(xd, qd, None, td, res, nw, 1e-5, sparsity=sparsity, scales=s_down)
    h_ref = res.double() + reference_sparse_linear(xd.double(), dequantize(qd, s_down, torch.float64), None, td)
    assert float((h.double() - h_ref).norm() / h_ref.norm()) < 1e-2
    out_ref = reference_rmsnorm(h_ref, nw.double(), 1e-5)
    assert float((out.double() - out_ref).norm() / out_ref.norm()) < 1e-2


@pytest.mark.parametrize("rows", [2, 8, 16])
def test_shared_mask_ops_on_the_8b_shapes(rows):
    """One mask for the batch on the default configs of Llama-3-8B's shapes (grouped q/k/v, SwiGLU gate/up, down),
    against the float64 shared-mask reference."""
    from teal_fx.kernels import sparse_gemv as sg

    g = torch.Generator(device="cuda").manual_seed(rows)
    w = lambda N, K: (torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K**0.5).t().contiguous().t()
    x = torch.randn(rows, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    t = float(x.float().abs().mean(0).quantile(0.5))
    qkv = [w(4096, 4096), w(1024, 4096), w(1024, 4096)]
    for y, wi in zip(sg.sparse_gemv_group(x, qkv, [None] * 3, [t] * 3, sparsity=0.5, shared=True), qkv):
        ref = reference_sparse_linear(x.double(), wi.double(), None, t, shared=True)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    wg, wu = w(14336, 4096), w(14336, 4096)
    got = sg.sparse_gemv_swiglu(x, wg, wu, t, t, sparsity=0.5, shared=True)
    gate = reference_sparse_linear(x.double(), wg.double(), None, t, shared=True)
    up = reference_sparse_linear(x.double(), wu.double(), None, t, shared=True)
    ref = torch.nn.functional.silu(gate) * up
    assert float((got.double() - ref).norm() / ref.norm()) < 2e-2
    xd = torch.randn(rows, 14336, device="cuda", generator=g, dtype=torch.bfloat16)
    td = float(xd.float().abs().mean(0).quantile(0.5))
    wd = w(4096, 14336)
    ref = reference_sparse_linear(xd.double(), wd.double(), None, td, shared=True)
    got = sg.sparse_gemv(xd, wd, None, td, sparsity=0.5, shared=True)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-2


def test_per_row_batches_go_to_cublas_where_the_union_cannot_win(monkeypatch):
    """Per-row masks over 8 rows at 50% keep ~all weight rows: the op runs the masked input through cuBLAS (never
    slower than dense), same result; a shared mask over the same rows launches the kernel where this GPU's table
    says it wins."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.sparse_gemv_config import kernel_pays

    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64).t().contiguous().t()
    launched = []
    real = sg.sparse_gemv_group
    monkeypatch.setattr(sg, "sparse_gemv_group", lambda *a, **k: launched.append(k.get("shared")) or real(*a, **k))
    y = torch.ops.teal.sparse_linear(x, wt, None, 0.7, 1.0, 0.5, None, False)
    torch.testing.assert_close(y.double(), _reference(x, wt, None, 0.7), rtol=2e-2, atol=2e-2)
    assert launched == []
    torch.ops.teal.sparse_linear(x, wt, None, 0.7, 1.0, 0.5, None, True)
    assert launched == ([True] if kernel_pays(8, 0.5, True, torch.cuda.get_device_name(), 4096, 4096) else [])


def test_shared_plan_decodes_a_batch_in_cuda_graphs_like_its_masked_reference():
    """A shared-mask plan through the lean loop's graphs (CUDA graphs, batch 4), fed the same tokens as the eager
    model whose linears see the batch's mean-|x| mask: the same logits at every step. In fp32: in bf16 the two
    paths' roundings flip near-threshold channels, and a flipped shared channel drops or keeps a large entry of
    some row (its mean is near t, not its entries), which then compounds through the cache (8% apart on the CPU,
    whose ops are the references themselves; 38% on the H200)."""
    from teal_fx.generate import decode_logits

    model = tiny_model("llama", hidden=256, inter=512).cuda()
    data = torch.randint(3, 128, (24, 64))  # a batch of 16 rows from 16 different windows (shared_thresholds.py)
    plan = teal_fx.calibrate(model, data, sparsity=0.5, method="uniform", batch_mask="shared", progress=False,
                             num_sequences=24, seq_len=64)
    tokens = torch.randint(3, 128, (4, 24), device="cuda")
    got = decode_logits(model, tokens, 12, mode="reduce-overhead")
    with masked_inputs(model, plan, sparse_from=1.0):
        ref = decode_logits(model, tokens, 12, backend="none")
    dense = decode_logits(model, tokens, 12, backend="none")
    err = float((got - ref).norm() / ref.norm())
    assert err < 1e-3, err
    assert float((dense - ref).norm() / ref.norm()) > 0.1  # the masks matter


def test_compile_with_a_plan_given_in_options_leaves_the_layout_alone_and_says_so():
    """torch.compile(model, backend="teal", options={"plan": plan}) with nothing attached: the backend never moves
    weights during Dynamo's compile (torch 2.11 refuses a parameter whose strides change there: "Guard failed on the
    same frame it was created"), so the row-major weights run, correct, with a warning that says to attach the plan
    first; attached, they are column-major."""
    model = tiny_model("llama", hidden=128, inter=256, dtype=torch.bfloat16).cuda()
    plan = _plan(model, 0.3)
    compiled = torch.compile(model, backend="teal", options={"plan": plan})
    ids = torch.randint(3, 128, (1, 1), device="cuda")
    up = model.model.layers[0].mlp.up_proj.weight
    import teal_fx.backend as backend
    backend._warned_layout = False
    with torch.no_grad(), pytest.warns(UserWarning, match="attach_plan"):
        got = compiled(ids, use_cache=False).logits.float()
    assert not up.t().is_contiguous()
    with torch.no_grad(), masked_inputs(model, plan, sparse_from=1.0):
        ref = model(ids, use_cache=False).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    teal_fx.attach_plan(model, plan)
    assert up.t().is_contiguous()


def test_a_second_plan_keeps_its_cuda_graphs():
    """The variant compiled for a later plan keeps Dynamo's static-input marks (parameters, the KV cache), so its
    cache writes are not "mutated inputs" and its decode step is still captured as a CUDA graph (before the fix:
    skipped, and int8 at 0% after a 50% plan decoded at 32.6 tok/s on the 8B shape)."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", hidden=256, inter=512, dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 128, (1, 8), device="cuda")
    for t in (0.5, 0.2):
        teal_fx.attach_plan(model, _plan(model, t))
        before = counters["inductor"]["cudagraph_skips"]
        teal_fx.generate(model, ids, 6, mode="reduce-overhead", eos_token_id=-1)
        assert counters["inductor"]["cudagraph_skips"] == before, t


@pytest.mark.parametrize("rows", [2, 4, 8])
def test_shared_mask_ops_on_small_shapes_with_every_finish(rows):
    """A small model's shapes (below the 2048-column rule: the fallback tiles) through each op with a shared mask:
    grouped q/k/v, SwiGLU, add + RMSNorm, against the shared-mask reference in float64 (sparsity unknown, -1: the
    kernel whatever the dispatch table says)."""
    from teal_fx.kernels.reference import reference_rmsnorm

    g = torch.Generator(device="cuda").manual_seed(rows)
    w = lambda N, K: (torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K**0.5).t().contiguous().t()
    x = torch.randn(rows, 1, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    t = float(x.float().abs().mean(0).quantile(0.5))
    ref = lambda xx, ww, tt: reference_sparse_linear(xx.double(), ww.double(), None, tt, shared=True)
    rel = lambda got, want: float((got.double() - want).norm() / want.norm())
    qkv = [w(256, 256), w(128, 256), w(128, 256)]
    for y, wi in zip(torch.ops.teal.sparse_linear_group(x, qkv, [None] * 3, [t] * 3, 1.0, [-1.0] * 3, [None] * 3, True, False),
                     qkv):
        assert rel(y, ref(x, wi, t)) < 1e-2
    wg, wu = w(512, 256), w(512, 256)
    got = torch.ops.teal.sparse_swiglu(x, wg, wu, t, t, 1.0, [-1.0, -1.0], None, None, True)
    assert rel(got, torch.nn.functional.silu(ref(x, wg, t)) * ref(x, wu, t)) < 2e-2
    wo, res = w(256, 256), torch.randn(rows, 1, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    nw = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    h, out = torch.ops.teal.sparse_linear_add_rmsnorm(x, wo, None, t, 1.0, -1.0, res, nw, 1e-5, None, True)
    h_ref = res.double() + ref(x, wo, t)
    assert rel(h, h_ref) < 1e-2
    assert rel(out, reference_rmsnorm(h_ref, nw.double(), 1e-5)) < 2e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_x_int8_op_one_row_on_the_kernel_and_batches_on_its_grid(fmt):
    """activations="int8" on a GPU: one row takes the dp4a kernel, 3 rows round x in the op and take the float-x path;
    both give the reference's x on its int8 grid (to the bf16 output's rounding)."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.quantize import dequantize, quantize_int4, quantize_int8
    q, s = (quantize_int8 if fmt == "int8" else quantize_int4)(torch.randn(512, 256, device="cuda").bfloat16() / 16)
    for rows in (1, 3):
        x = torch.randn(rows, 1, 256, device="cuda", dtype=torch.bfloat16)
        assert sg.supports(x, q, s, x_int8=True) == (rows == 1)
        y = torch.ops.teal.sparse_linear(x, q, None, 0.6, 1.0, 0.5, s, False, True)
        ref = reference_sparse_linear(x.double(), dequantize(q, s, torch.float64), None, 0.6, x_int8=True)
        plain = reference_sparse_linear(x.double(), dequantize(q, s, torch.float64), None, 0.6)
        assert float((y.double() - ref).norm() / ref.norm()) < 4e-3
        assert float((ref - plain).norm() / plain.norm()) > 1e-3  # the grid differs from x: the check means something


@pytest.mark.parametrize("fmt", [None, "int8"])
@pytest.mark.parametrize("name", ["gpt2", "falcon"])
def test_other_structures_decode_in_cuda_graphs_like_their_masked_reference(name, fmt):
    """The structures whose linears reach the kernel in another form: GPT-2's weight read through a transpose (stored
    [in, out], left as it is by attach), Falcon's matmul rewritten to F.linear. fp32, teacher-forced as above. (OPT's
    rows flattened from tokens are checked on the CPU, where the reference keeps its prefill dense by hand: these
    hooks cannot tell a flattened prefill from decode rows.)"""
    from teal_fx.generate import decode_logits
    from tests.test_architectures import structure_model

    model = structure_model(name).cuda()
    data = torch.randint(3, 128, (4, 64))
    plan = teal_fx.calibrate(model, data, sparsity=0.5, weights=fmt, progress=False, num_sequences=4, seq_len=64)
    if name == "gpt2" and fmt is None:  # attach left the [in, out] weight as the GEMV reads its transpose
        w = model.transformer.h[0].mlp.c_fc.weight
        assert w.is_contiguous() and w.t().stride(0) == 1
    ids = torch.randint(3, 128, (1, 20), device="cuda")
    out = teal_fx.generate(model, ids, 10, mode="reduce-overhead", eos_token_id=-1)
    got = decode_logits(model, out, 20, mode="reduce-overhead")
    with masked_inputs(model, plan, sparse_from=1.0):
        ref = decode_logits(model, out, 20, backend="none")
    err = float((got - ref).norm() / ref.norm())
    assert err < 1e-3, err


@pytest.mark.parametrize("pdl", [True, False])
def test_folded_mlps_back_to_back_in_a_cuda_graph(pdl, monkeypatch):
    """``sparse_gemv_mlp_add_rmsnorm`` four times in one CUDA graph, each MLP's h the next one's residual and its norm
    the next one's x: each down launch reads the gate/up sums of the launch before, and each down finish must leave
    them zero before the next gate/up launch adds into them (with PDL that launch starts early). Against the same
    chain through the unfolded launchers (swiglu, then add + RMSNorm), replay after replay."""
    from teal_fx.kernels import sparse_gemv as sg

    monkeypatch.setenv("TEAL_PDL", "1" if pdl else "0")
    g = torch.Generator(device="cuda").manual_seed(0)
    H, inter = 1024, 2816
    col = lambda n, k: (torch.randn(n, k, device="cuda", generator=g) / k**0.5).t().contiguous().t()  # noqa: E731
    mlps = [(col(inter, H), col(inter, H), col(H, inter)) for _ in range(4)]
    nw = torch.rand(H, device="cuda", generator=g) + 0.5
    x_static, h_static = torch.randn(1, H, device="cuda"), torch.randn(1, H, device="cuda")

    def chain(x, h, folded):
        for wg, wu, wd in mlps:
            if folded:
                h, x = sg.sparse_gemv_mlp_add_rmsnorm(x, wg, wu, wd, 0.3, 0.3, 0.05, h, nw, 1e-6, sparsities=(0.4, 0.4))
            else:
                act = sg.sparse_gemv_swiglu(x, wg, wu, 0.3, 0.3, sparsity=0.4)
                h, x = sg.sparse_gemv_add_rmsnorm(act, wd, None, 0.05, h, nw, 1e-6, sparsity=0.4)
        return h, x

    chain(x_static, h_static, True)  # compile and reserve the workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out, x_out = chain(x_static, h_static, True)
    for seed in range(3):
        g.manual_seed(seed + 1)
        x_static.copy_(torch.randn(1, H, device="cuda", generator=g))
        h_static.copy_(torch.randn(1, H, device="cuda", generator=g))
        graph.replay()
        h_ref, x_ref = chain(x_static.clone(), h_static.clone(), False)
        for got, ref in ((h_out, h_ref), (x_out, x_ref)):
            assert float((got - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_folded_mlp_on_the_8b_shapes(fmt, sparsity):
    """The folded MLP launcher on Llama-3-8B's MLP with the rule's configs (the masked and the packed loops of every
    format) against the unfolded launchers: the same sums, met in another order."""
    from teal_fx.kernels import sparse_gemv as sg
    from teal_fx.kernels.quantize import quantize_int4, quantize_int8

    g = torch.Generator(device="cuda").manual_seed(int(sparsity * 100))

    def w(N, K):
        t = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K**0.5
        if fmt is None:
            return t.t().contiguous().t(), None
        return (quantize_int8 if fmt == "int8" else quantize_int4)(t)

    (qg, s_gate), (qu, s_up), (qd, s_down) = w(14336, 4096), w(14336, 4096), w(4096, 14336)
    x = torch.randn(1, 1, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    res, nw = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16), torch.rand(4096, device="cuda").bfloat16()
    t = float(x.float().abs().quantile(sparsity))
    act = sg.sparse_gemv_swiglu(x, qg, qu, t, t, sparsity=sparsity, scales_gate=s_gate, scales_up=s_up)
    td = float(act.float().abs().quantile(sparsity))
    h_ref, out_ref = sg.sparse_gemv_add_rmsnorm(act, qd, None, td, res, nw, 1e-5, sparsity=sparsity, scales=s_down)
    h, out = sg.sparse_gemv_mlp_add_rmsnorm(x, qg, qu, qd, t, t, td, res, nw, 1e-5, sparsities=(sparsity, sparsity),
                                            scales=(s_gate, s_up, s_down))
    for got, ref in ((h, h_ref), (out, out_ref)):
        assert float((got.double() - ref.double()).norm() / ref.double().norm()) < 1e-2


BOTH_FOLDS = ("fold_swiglu", "fold_qkv_attention")


# each fold alone on float weights, both on each format (~30 s a case on an H100: the compiles)
@pytest.mark.parametrize("fmt, folds", [(None, ("fold_swiglu",)), (None, ("fold_qkv_attention",)), (None, BOTH_FOLDS),
                                        ("int8", BOTH_FOLDS), ("int4", BOTH_FOLDS)],
                         ids=["float-swiglu", "float-qkv", "float-both", "int8-both", "int4-both"])
def test_folded_finishes_decode_like_the_unfolded_step(fmt, folds):
    """The backend with ``fold_swiglu`` and / or ``fold_qkv_attention``: the lean loop (CUDA graphs) fed the same
    tokens gives the unfolded step's logits (fp32: the sums met in another order, which can flip an input at its
    threshold: the bound of the quantized decode's test above)."""
    from teal_fx.generate import decode_logits

    model = tiny_model("llama", hidden=256, inter=512, dtype=torch.float32).cuda()
    teal_fx.calibrate(model, torch.randint(3, 128, (4, 64)), sparsity=0.5, weights=fmt, progress=False,
                      num_sequences=4, seq_len=64)
    tokens = torch.randint(3, 128, (2, 24), device="cuda")
    folded, plain = (decode_logits(model, tokens, 12, mode="reduce-overhead", options=dict.fromkeys(folds, f))
                     for f in (True, False))
    assert float((folded - plain).norm() / plain.norm()) < 1e-3
