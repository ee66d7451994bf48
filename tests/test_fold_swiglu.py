"""fold_swiglu_into_down: a decode graph's ``teal::sparse_swiglu`` read only by down's
``teal::sparse_linear_add_rmsnorm`` becomes one teal::sparse_mlp_add_rmsnorm, and the step computes what it computed
(on the CPU the op runs the two ops it replaced: the same logits, bit for bit). The kernel's own test is
tests/test_mlp_add_rmsnorm_kernel.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import teal_fx
from teal_fx.passes import fold_swiglu_into_down
from teal_fx.passes.analysis.dataflow import fake_value
from tests.conftest import count_calls, decode_graph_after_passes, logits_per_option, tiny_model

FOLDED = torch.ops.teal.sparse_mlp_add_rmsnorm.default
SWIGLU = torch.ops.teal.sparse_swiglu.default
ADD_RMSNORM = torch.ops.teal.sparse_linear_add_rmsnorm.default


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_folds_every_mlp_of_a_decode_graph(arch):
    gm = decode_graph_after_passes(tiny_model(arch, layers=3), torch.tensor([[4], [7]]))
    assert count_calls(gm, FOLDED) == 3 and count_calls(gm, SWIGLU) == 0
    assert count_calls(gm, ADD_RMSNORM) == 3  # o's stay
    node = next(n for n in gm.graph.nodes if n.target is FOLDED)
    assert [node.meta[k].role for k in ("teal", "teal_up", "teal_down")] == ["gate", "up", "down"]
    h, out = fake_value(node)  # the (h, norm) pair of the node it replaced
    assert h.shape == out.shape == (2, 1, 64)


def test_the_block_dump_names_the_linears_the_folded_op_stands_for():
    from teal_fx.passes.dump import block_dot

    dot = block_dot(decode_graph_after_passes(tiny_model("llama", layers=2), torch.tensor([[4]])), 0)
    assert "gate+up+down" in dot and '"gate\\n' not in dot


def test_on_by_default_and_leaves_what_it_cannot_fold():
    model = tiny_model("llama", layers=2)
    folded = lambda m, ids, **o: count_calls(decode_graph_after_passes(m, torch.tensor(ids), **o), FOLDED)  # noqa: E731
    assert folded(model, [[4]]) == 2  # on by default (options.py: timed in docs/perf-log.md v49)
    assert folded(model, [[4]], fold_swiglu=False) == 0
    assert folded(model, [[4, 5, 6]]) == 0  # prefill: no add_rmsnorm
    assert folded(model, [[4]], fuse_swiglu=False) == 0
    assert folded(tiny_model("phi3"), [[4]]) == 0  # Phi-3's fused gate_up


def test_leaves_a_swiglu_with_another_reader_alone():
    gm = decode_graph_after_passes(tiny_model("llama", layers=1), torch.tensor([[4]]), fold_swiglu=False)
    act = next(n for n in gm.graph.nodes if n.target is SWIGLU)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # a second reader of silu(gate) * up
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (act,))
    out.args = ((*out.args[0], extra),) if isinstance(out.args[0], tuple) else out.args
    gm.recompile()
    assert len(act.users) == 2
    assert count_calls(fold_swiglu_into_down(gm), FOLDED) == 0


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "mistral"]), batch=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), sparsity=st.sampled_from([0.0, 0.4, 0.7]),
       seed=st.integers(0, 100))
def test_folded_step_computes_what_the_graph_computed(arch, batch, dtype, sparsity, seed):
    model = tiny_model(arch, layers=2, dtype=dtype, seed=seed)
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), sparsity)
    ids = torch.randint(3, 128, (batch, 1), generator=torch.Generator().manual_seed(seed))
    counters.clear()
    folded, plain = logits_per_option(model, plan, ids, "fold_swiglu")
    assert counters["teal"]["swiglu_folded"] == 2  # both blocks, in the folded compile only
    torch.testing.assert_close(folded, plain, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
def test_opcheck(fmt):
    """The schema (no mutation), the fake's shapes and strides, and the CPU path (the two ops' references)."""
    from teal_fx.kernels.quantize import quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    ws = [torch.randn(n, k, generator=g) / k**0.5 for n, k in ((48, 32), (48, 32), (32, 48))]
    scales = [None] * 3
    if fmt is not None:
        ws, scales = map(list, zip(*({"int8": quantize_int8, "int4": quantize_int4}[fmt](w) for w in ws)))
    args = (x, *ws, None, 0.1, 0.2, 0.05, 1.0, [0.3, 0.3, 0.3], res, torch.ones(32), 1e-6, *scales)
    torch.library.opcheck(FOLDED, args, test_utils=("test_schema", "test_faketensor"))
    h, out = FOLDED(*args)
    act = torch.ops.teal.sparse_swiglu(x, ws[0], ws[1], 0.1, 0.2, 1.0, [0.3, 0.3], scales[0], scales[1])
    h_ref, out_ref = ADD_RMSNORM(act, ws[2], None, 0.05, 1.0, 0.3, res, torch.ones(32), 1e-6, scales[2])
    assert torch.equal(h, h_ref) and torch.equal(out, out_ref)
