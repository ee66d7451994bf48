"""fold_attention_merge_into_o: a decode graph's ``teal::sparse_qkv_rope_attention`` whose output reaches o's
``teal::sparse_linear_add_rmsnorm`` only through views becomes one teal::sparse_attention_add_rmsnorm, and the step
computes what it computed (on the CPU the op runs the two ops it replaced: the same logits and caches, bit for
bit). The kernels' own test is in tests/test_attention_merge_kernel.py."""
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch._dynamo.utils import counters

import teal_fx
from teal_fx.passes.fold_attention_merge_into_o import _puts_heads_side_by_side, fold_attention_merge_into_o
from tests.conftest import tiny_model
from tests.test_fold_qkv_attention import attention_op_args
from tests.test_fold_rope import assert_fold_keeps_the_step

FOLDED = torch.ops.teal.sparse_attention_add_rmsnorm.default
ATTENTION = torch.ops.teal.sparse_qkv_rope_attention.default
O_ADD_RMSNORM = torch.ops.teal.sparse_linear_add_rmsnorm.default


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "mistral"]), batch=st.integers(1, 3),
       prompt=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_folded_step_computes_what_the_graph_computed(arch, batch, prompt, dtype, seed):
    assert_fold_keeps_the_step("fold_attention_merge", "attention_merge_folded", arch, batch, prompt, dtype, seed)


def _attention_then_views(views: list[tuple[str, tuple]], shape=(2, 4, 1, 8)) -> tuple[fx.GraphModule, fx.Node]:
    """A graph: a placeholder standing for the attention's output (its example value of ``shape``), then ``views``
    (method name, arguments) one after another; returns it and the placeholder."""
    g = fx.Graph()
    a = g.placeholder("attn")
    a.meta["example_value"] = torch.empty(shape)
    node = a
    for name, args in views:
        node = g.call_method(name, (node, *args))
    g.output(node)
    return fx.GraphModule(torch.nn.Module(), g), a


@pytest.mark.parametrize("views,ok", [
    ([("transpose", (1, 2)), ("contiguous", ()), ("reshape", (2, 1, -1))], True),  # Llama's
    ([("reshape", (2, -1, 1, 8)), ("transpose", (1, 2)), ("reshape", (2, 1, 32)), ("contiguous", ())], True),
    ([("permute", (0, 2, 1, 3)), ("view", (2, 1, 32))], True),
    ([("reshape", (2, 1, 32))], True),  # with one position, [B, H, 1, D] is already the heads side by side
    ([("permute", (0, 2, 3, 1)), ("reshape", (2, 1, 32))], False),  # D before H: another order of o's inputs
    ([("transpose", (2, 3)), ("reshape", (2, 1, 32))], True),  # moves the size-1 position axis only
    ([("transpose", (1, 3)), ("reshape", (2, 1, 32))], False),
    ([("reshape", (2, 1, 4, 8)), ("transpose", (2, 3)), ("reshape", (2, 1, 32))], False),
    ([("transpose", (1, 2))], False),  # not yet flattened: [B, 1, H, D] is not o's input
])
def test_only_views_that_put_the_heads_side_by_side(views, ok):
    gm, a = _attention_then_views(views)
    chain = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert _puts_heads_side_by_side(a, chain) is ok


def test_refused_where_the_attention_has_another_user():
    """The attention's output also read elsewhere (here: returned) must stay: nothing folds."""
    model = tiny_model("llama", layers=1)
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3)
    gm = _decode_graph_with_folds(model, plan)
    attn = next(n for n in gm.graph.nodes if n.target is ATTENTION)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], attn) if isinstance(out.args[0], tuple) else (out.args[0], attn),)
    counters.clear()
    fold_attention_merge_into_o(gm)
    assert counters["teal"]["attention_merge_folded"] == 0
    assert any(n.target is ATTENTION for n in gm.graph.nodes)


def test_fold_keeps_meta_and_labels():
    model = tiny_model("llama", layers=1)
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3)
    gm = _decode_graph_with_folds(model, plan)
    o = next(n for n in gm.graph.nodes if n.target is O_ADD_RMSNORM and _reads_attention(n))
    o_val, o_label = o.meta.get("example_value", o.meta.get("val")), o.meta.get("teal")
    attn_label = next(n for n in gm.graph.nodes if n.target is ATTENTION).meta.get("teal")
    fold_attention_merge_into_o(gm)
    (new,) = [n for n in gm.graph.nodes if n.target is FOLDED]
    assert new.meta.get("example_value", new.meta.get("val")) is o_val
    assert new.meta.get("teal") == attn_label and new.meta.get("teal_o") == o_label
    assert {u.target for u in new.users} == {operator.getitem}


def test_opcheck():
    """The schema's mutations (the two caches, nothing else), the fake's shapes, and the CPU path: the attention's
    arguments, then o's (a [32, 64] weight over the 4 heads of 16), the residual and the norm's."""
    args = (*attention_op_args(), torch.randn(32, 64), None, 0.05, 0.3, None, torch.randn(2, 1, 32), torch.ones(32),
            1e-6)
    torch.library.opcheck(FOLDED, args, test_utils=("test_schema", "test_faketensor"))
    h, out = FOLDED(*args)
    assert h.shape == out.shape == (2, 1, 32)


def _reads_attention(o: fx.Node) -> bool:
    node = o.args[0]
    while isinstance(node, fx.Node) and node.op == "call_method":
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target is ATTENTION


def _decode_graph_with_folds(model, plan) -> fx.GraphModule:
    """One decode step's graph over a static cache, after the passes up to the attention fold (this fold off)."""
    from teal_fx.generate import cache_kwarg, static_cache
    from teal_fx.passes import PassContext, run_passes

    cache = static_cache(model, 1, 16)
    with torch.no_grad():
        model(torch.tensor([[4, 5]]), **{cache_kwarg(model): cache}, cache_position=torch.arange(2), use_cache=True)
    (cg,) = teal_fx.capture_graphs(model, dict(input_ids=torch.tensor([[6]]), **{cache_kwarg(model): cache},
                                               cache_position=torch.tensor([2]), use_cache=True))[0]
    return run_passes(cg.gm, PassContext(options=teal_fx.TealOptions(fold_attention_merge=False), plan=plan))
