"""fold_rope_into_qkv_finish: a decode graph's q/k/v group, RoPE and static-cache writes become one
teal::sparse_linear_qkv_rope, only for transformers' exact RoPE chain, and the step computes what it computed:
the same logits and the same cache contents, bit for bit (on the CPU the op runs the very ops it replaced)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import teal_fx
from teal_fx.generate import cache_kwarg, static_cache
from tests.conftest import tiny_model

FOLDED = torch.ops.teal.sparse_linear_qkv_rope.default


def _plan(model):
    return teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3)


def _decode_step(model, plan, ids, prompt, **options):
    """(logits, key caches, value caches, folds) of one decode step after ``prompt``, through the teal backend with
    the eager inner compiler."""
    cache = static_cache(model, ids.shape[0], 16)
    n = prompt.shape[1]
    with torch.no_grad():
        model(prompt, **{cache_kwarg(model): cache}, cache_position=torch.arange(n), use_cache=True)
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager", **options})
        logits = step(ids, **{cache_kwarg(model): cache}, cache_position=torch.tensor([n]), use_cache=True).logits
    keys = [layer.keys.clone() for layer in cache.layers]
    values = [layer.values.clone() for layer in cache.layers]
    return logits, keys, values, counters["teal"]["rope_folded"]


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gemma"]), batch=st.integers(1, 3),
       prompt=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_folded_step_computes_what_the_graph_computed(arch, batch, prompt, dtype, seed):
    assert_fold_keeps_the_step("fold_rope", "rope_folded", arch, batch, prompt, dtype, seed)


def assert_fold_keeps_the_step(option: str, counter: str, arch: str, batch: int, prompt: int, dtype, seed: int):
    """One decode step of a 2-layer ``arch`` model with the fold ``option`` on, then off: ``counter`` says it folded
    every block, then none, and the logits and both caches are the same bits (on the CPU each folded op runs the ops
    it replaced)."""
    model = tiny_model(arch, layers=2, dtype=dtype, seed=seed)
    plan = _plan(model)
    g = torch.Generator().manual_seed(seed)
    ids, prompt_ids = torch.randint(3, 128, (batch, 1), generator=g), torch.randint(3, 128, (batch, prompt), generator=g)
    folded = _decode_step(model, plan, ids, prompt_ids, **{option: True})
    assert counters["teal"][counter] == 2  # every block
    plain = _decode_step(model, plan, ids, prompt_ids, **{option: False})
    assert counters["teal"][counter] == 0
    assert torch.equal(folded[0], plain[0])
    for a, b in zip(folded[1] + folded[2], plain[1] + plain[2]):
        assert torch.equal(a, b)  # the cache rows written, and no other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    """The schema's mutations (the two caches, nothing else), the fake's shape and strides, and the CPU path."""
    x = torch.randn(2, 1, 32, dtype=dtype)
    ws = [torch.randn(n, 32, dtype=dtype) for n in (64, 32, 32)]
    cos, sin = torch.randn(2, 1, 1, 16, dtype=dtype), torch.randn(1, 1, 1, 16, dtype=dtype)
    caches = [torch.zeros(2, 2, 8, 16, dtype=dtype) for _ in range(2)]
    for bs in ([None] * 3, [torch.randn(n, dtype=dtype) for n in (64, 32, 32)]):
        for norms in ([None, None], [torch.rand(16, dtype=dtype) + 0.5 for _ in range(2)]):
            torch.library.opcheck(FOLDED, (x, ws, bs, [0.5, 0.1, 0.0], 1.0, [0.5, 0.4, 0.4], [None] * 3, False, False,
                                           16, cos, sin, torch.tensor([3]), *caches, *norms, 1e-6))


def test_leaves_other_shapes_alone():
    """A fused qkv (Phi-3), ungrouped q/k/v, and a prefill keep their graphs."""
    ids, prompt = torch.tensor([[5]]), torch.tensor([[4, 6, 7]])
    model = tiny_model("phi3")
    assert _decode_step(model, _plan(model), ids, prompt, fold_rope=True)[3] == 0
    model = tiny_model("llama")
    assert _decode_step(model, _plan(model), ids, prompt, fold_rope=True, group_shared_input=False)[3] == 0
    counters.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="teal", options={"plan": _plan(model), "compiler": "eager", "fold_rope": True})(
            prompt, **{cache_kwarg(model): static_cache(model, 1, 16)}, cache_position=torch.arange(3), use_cache=True)
    assert counters["teal"]["rope_folded"] == 0


def test_qwen3_folds_its_q_and_k_norms():
    """Qwen3's per-head RMSNorm of q and k goes into the op (its weights and eps), and the step is unchanged."""
    model = tiny_model("qwen3")
    ids, prompt = torch.tensor([[5], [9]]), torch.tensor([[4, 6, 7], [3, 3, 8]])
    folded, plain = (_decode_step(model, _plan(model), ids, prompt, fold_rope=f) for f in (True, False))
    assert folded[3] == 2 and torch.equal(folded[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(folded[1] + folded[2], plain[1] + plain[2]))


def test_leaves_an_interleaved_rope_alone(monkeypatch):
    """GPT-J's interleaved rotation (pairs (2i, 2i + 1)) is another RoPE: not folded, and the step unchanged."""
    import transformers.models.llama.modeling_llama as llama

    def rotate_interleaved(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    monkeypatch.setattr(llama, "rotate_half", rotate_interleaved)
    model = tiny_model("llama")
    ids, prompt = torch.tensor([[5]]), torch.tensor([[4, 6, 7]])
    folded, plain = (_decode_step(model, _plan(model), ids, prompt, fold_rope=f) for f in (True, False))
    assert folded[3] == 0 and torch.equal(folded[0], plain[0])


def test_generate_through_inductor_is_unchanged():
    """The lean decode loop through Inductor (which must write the caches in place, not into copies): the same
    tokens with and without the fold, and the op in the compiled decode graph."""
    model = tiny_model("llama")
    plan = _plan(model)
    teal_fx.attach_plan(model, plan, check=False)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    outs = []
    for fold in (False, True):
        torch._dynamo.reset()
        counters.clear()
        outs.append(teal_fx.generate(model, ids, 8, eos_token_id=-1, backend="teal", options={"fold_rope": fold}))
        assert counters["teal"]["rope_folded"] == (2 if fold else 0)
    assert torch.equal(outs[0], outs[1])


def test_dump_shows_the_folded_op(tmp_path):
    model = tiny_model("llama")
    # the attention's fold (on by default) would take this op into sparse_qkv_rope_attention: this is the RoPE fold's
    _decode_step(model, _plan(model), torch.tensor([[5]]), torch.tensor([[4]]), fold_rope=True,
                 fold_qkv_attention=False, dump=str(tmp_path))
    after = next(tmp_path.rglob("after.py")).read_text()
    assert after.count("teal.sparse_linear_qkv_rope") == 2 and "index_copy_" not in after
    summary = next(tmp_path.rglob("summary.txt")).read_text()
    assert "sparse_linear_qkv_rope x2" in summary and "sparse_linear_group" not in summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch,weights", [("llama", None), ("llama", "int8"), ("llama", "int4"), ("qwen3", None),
                                          ("qwen3", "int8")])
def test_folded_decode_on_the_gpu_follows_the_unfolded(arch, weights):
    """The kernel path end to end in CUDA graphs: teacher-forced logits with and without the fold agree to the
    split-K sums' rounding, whose order varies between launches. In fp32: in bf16 that rounding flips near-threshold
    inputs, which compounds through the cache (the finish's bf16 rounding is test_qkv_rope_kernel's)."""
    from teal_fx.generate import decode_logits

    model = tiny_model(arch, layers=2, hidden=256, heads=4, kv_heads=2, inter=512).cuda()
    teal_fx.calibrate(model, torch.randint(3, 128, (4, 64)), sparsity=0.4, weights=weights, progress=False,
                      num_sequences=4, seq_len=64)
    tokens = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    counters.clear()
    folded = decode_logits(model, tokens, 4, mode="reduce-overhead", options={"fold_rope": True})
    assert counters["teal"]["rope_folded"] == 2
    plain = decode_logits(model, tokens, 4, mode="reduce-overhead")
    rel = float((folded - plain).norm() / plain.norm())
    assert rel < 1e-4, rel
