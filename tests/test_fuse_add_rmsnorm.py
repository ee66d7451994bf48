"""fuse_add_rmsnorm: a decode graph's ``residual + sparse_linear`` followed by Llama's RMSNorm becomes one
teal::sparse_linear_add_rmsnorm, only for the exact eager chain, in decode graphs, where nothing else reads the pieces
and no gradient is recorded (meaning preserved: test_rewrite's property test runs the fused graphs too)."""
import pytest
import torch

import teal_fx
from teal_fx.passes import PassContext, run_passes
from tests.conftest import count_calls, decode_graph_after_passes, logits_per_option, tiny_model

FUSED = torch.ops.teal.sparse_linear_add_rmsnorm.default
LINEAR = torch.ops.teal.sparse_linear.default


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_fuses_every_o_and_down_of_a_decode_graph(arch):
    model = tiny_model(arch, layers=3)
    gm = decode_graph_after_passes(model, torch.tensor([[4], [7]]), fold_swiglu=False)  # down's op stays its own
    # Phi-3's fused qkv and gate_up projections stay plain sparse linears (no residual add after them)
    assert count_calls(gm, FUSED) == 2 * 3 and count_calls(gm, LINEAR) == (2 * 3 if arch == "phi3" else 0)
    # the chains are gone: 6 norms fewer (Qwen3's q/k norms and the first input norm, after the embedding, stay)
    unfused = decode_graph_after_passes(model, torch.tensor([[4], [7]]), fuse_add_rmsnorm=False)
    rsqrts = [sum("rsqrt" in str(n.target) for n in g.graph.nodes) for g in (gm, unfused)]
    assert rsqrts[1] - rsqrts[0] == 6


def test_leaves_prefill_graphs_and_other_norms_alone():
    assert count_calls(decode_graph_after_passes(tiny_model("llama"), torch.tensor([[4, 5, 6]])), FUSED) == 0  # prefill: Inductor's norm
    assert count_calls(decode_graph_after_passes(tiny_model("gemma"), torch.tensor([[4]])), FUSED) == 0  # Gemma: (1 + w), fp32 product
    gm = decode_graph_after_passes(tiny_model("llama"), torch.tensor([[4]]), fuse_add_rmsnorm=False)
    assert count_calls(gm, FUSED) == 0 and count_calls(gm, LINEAR) == 2 * 2


def test_leaves_a_linear_with_another_reader_alone():
    """A linear output that something besides the residual add reads keeps its own op."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o = torch.nn.Linear(16, 16, bias=False)
            self.w = torch.nn.Parameter(torch.ones(16))

        def forward(self, x, r):
            y = self.o(x)
            h = r + y
            hf = h.to(torch.float32)
            n = self.w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
            return n, y  # y read twice

    from teal_fx.passes import fuse_add_rmsnorm

    gm = torch.fx.symbolic_trace(Block())
    for n in gm.graph.nodes:
        if n.op == "call_module":  # stand-in for what insert_sparse_linear makes of a matched linear
            with gm.graph.inserting_before(n):
                w = gm.graph.get_attr("o.weight")
                new = gm.graph.call_function(LINEAR, (n.args[0], w, None, 0.1, 1.0, -1.0))
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
    gm.recompile()
    assert count_calls(fuse_add_rmsnorm(gm), FUSED) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_step_is_unchanged_by_the_fusion(dtype):
    """With and without the fusion the compiled decode step gives the same logits (CPU: the op's reference path is
    the eager expression it replaced)."""
    model = tiny_model("llama", layers=2, dtype=dtype)
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.4)
    outs = logits_per_option(model, plan, torch.randint(3, 128, (3, 1)), "fuse_add_rmsnorm")
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_not_under_autograd():
    model = tiny_model("llama")
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3)
    (cg,) = teal_fx.capture_graphs(model, dict(input_ids=torch.tensor([[4]]), use_cache=False))[0]
    for n in cg.gm.graph.nodes:  # as Dynamo records them when gradients are on
        v = n.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.is_floating_point() and n.op != "placeholder":
            n.meta["example_value"] = torch.empty(v.shape, dtype=v.dtype, requires_grad=True)
    assert count_calls(run_passes(cg.gm, PassContext(plan=plan)), FUSED) == 0
