"""fold_mlp_norm_into_gate_up: a decode graph's o ``teal::sparse_linear_add_rmsnorm`` whose (h, norm) pair only the
MLP's ``teal::sparse_mlp_add_rmsnorm`` reads becomes one teal::sparse_o_mlp_add_rmsnorm, and the step computes what
it computed (on the CPU the op runs the two ops it replaced: the same logits, bit for bit). The kernel's own test is
tests/test_o_mlp_add_rmsnorm_kernel.py."""
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import teal_fx
from teal_fx.passes import fold_mlp_norm_into_gate_up
from teal_fx.passes.analysis.dataflow import fake_value
from tests.conftest import count_calls, decode_graph_after_passes, logits_per_option, tiny_model

FOLDED = torch.ops.teal.sparse_o_mlp_add_rmsnorm.default
MLP = torch.ops.teal.sparse_mlp_add_rmsnorm.default
ADD_RMSNORM = torch.ops.teal.sparse_linear_add_rmsnorm.default


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_folds_every_block_of_a_decode_graph(arch):
    gm = decode_graph_after_passes(tiny_model(arch, layers=3), torch.tensor([[4], [7]]), fold_mlp_norm=True)
    assert count_calls(gm, FOLDED) == 3 and count_calls(gm, MLP) == 0 and count_calls(gm, ADD_RMSNORM) == 0
    node = next(n for n in gm.graph.nodes if n.target is FOLDED)
    assert [node.meta[k].role for k in ("teal", "teal_gate", "teal_up", "teal_down")] == ["o", "gate", "up", "down"]
    h, out = fake_value(node)  # the MLP's (h, norm) pair, of the node it replaced
    assert h.shape == out.shape == (2, 1, 64)


def test_off_by_default_and_leaves_what_it_cannot_fold():
    model = tiny_model("llama", layers=2)
    folded = lambda m, ids, **o: count_calls(decode_graph_after_passes(m, torch.tensor(ids), **o), FOLDED)  # noqa: E731
    assert folded(model, [[4]]) == 0  # off until timed (options.py)
    assert folded(model, [[4]], fold_mlp_norm=True) == 2
    assert folded(model, [[4]], fold_mlp_norm=True, fold_swiglu=False) == 0  # it folds into the folded MLP only
    assert folded(model, [[4, 5, 6]], fold_mlp_norm=True) == 0  # prefill: no add_rmsnorm


def test_leaves_an_o_whose_h_has_another_reader_alone():
    gm = decode_graph_after_passes(tiny_model("llama", layers=1), torch.tensor([[4]]))
    o = next(n for n in gm.graph.nodes if n.target is ADD_RMSNORM)
    h = next(u for u in o.users if u.target is operator.getitem and u.args[1] == 0)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # a second reader of h (say, output_hidden_states)
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (h,))
    out.args = ((*out.args[0], extra),) if isinstance(out.args[0], tuple) else out.args
    gm.recompile()
    assert len(h.users) == 2
    assert count_calls(fold_mlp_norm_into_gate_up(gm), FOLDED) == 0


def test_the_block_dump_names_the_linears_the_folded_op_stands_for():
    from teal_fx.passes.dump import block_dot

    gm = decode_graph_after_passes(tiny_model("llama", layers=2), torch.tensor([[4]]), fold_mlp_norm=True)
    assert "o+gate+up+down" in block_dot(gm, 0)


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "mistral"]), batch=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), sparsity=st.sampled_from([0.0, 0.4, 0.7]),
       seed=st.integers(0, 100))
def test_folded_step_computes_what_the_graph_computed(arch, batch, dtype, sparsity, seed):
    model = tiny_model(arch, layers=2, dtype=dtype, seed=seed)
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), sparsity)
    ids = torch.randint(3, 128, (batch, 1), generator=torch.Generator().manual_seed(seed))
    counters.clear()
    folded, plain = logits_per_option(model, plan, ids, "fold_mlp_norm")
    assert counters["teal"]["mlp_norm_folded"] == 2  # both blocks, in the folded compile only
    torch.testing.assert_close(folded, plain, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
def test_opcheck(fmt):
    """The schema (no mutation), the fake's shapes and strides, and the CPU path (the two ops' references)."""
    from teal_fx.kernels.quantize import quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    a, res = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    ws = [torch.randn(n, k, generator=g) / k**0.5 for n, k in ((32, 32), (48, 32), (48, 32), (32, 48))]
    scales = [None] * 4
    if fmt is not None:
        ws, scales = map(list, zip(*({"int8": quantize_int8, "int4": quantize_int4}[fmt](w) for w in ws)))
    nw1, nw2 = torch.rand(32, generator=g) + 0.5, torch.rand(32, generator=g) + 0.5
    args = (a, ws[0], None, 0.1, res, nw1, 1e-5, ws[1], ws[2], ws[3], None, 0.1, 0.2, 0.05, 1.0, [0.3] * 4, nw2, 1e-6,
            *scales)
    torch.library.opcheck(FOLDED, args, test_utils=("test_schema", "test_faketensor"))
    h, out = FOLDED(*args)
    h1, x = ADD_RMSNORM(a, ws[0], None, 0.1, 1.0, 0.3, res, nw1, 1e-5, scales[0])
    h_ref, out_ref = MLP(x, ws[1], ws[2], ws[3], None, 0.1, 0.2, 0.05, 1.0, [0.3] * 3, h1, nw2, 1e-6, *scales[1:])
    assert torch.equal(h, h_ref) and torch.equal(out, out_ref)
