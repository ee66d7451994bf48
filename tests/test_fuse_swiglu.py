"""fuse_swiglu: silu(gate) * up of a gate/up group becomes one teal::sparse_swiglu, only where nothing else reads
the pieces and no gradient is recorded (meaning preserved: test_rewrite's property test runs the fused graphs)."""
import operator

import torch
import torch.nn.functional as F
from torch import fx

from teal_fx.passes import fuse_swiglu

GROUP = torch.ops.teal.sparse_linear_group.default
SWIGLU = torch.ops.teal.sparse_swiglu.default


def _mlp_graph(extra_user: bool = False, act=F.silu, swap: bool = False, requires_grad: bool = False):
    """x -> group([gate, up]) -> act(gate) * up (-> + act(gate) when extra_user), with fake values like Dynamo's."""
    g = fx.Graph()
    x, wg, wu = g.placeholder("x"), g.placeholder("wg"), g.placeholder("wu")
    grp = g.call_function(GROUP, (x, [wg, wu], [None, None], [0.3, 0.6], 1.0, [0.5, 0.4], [None, None], False, False))
    gate, up = g.call_function(operator.getitem, (grp, 0)), g.call_function(operator.getitem, (grp, 1))
    a = g.call_function(act, (gate,))
    h = g.call_function(operator.mul, (up, a) if swap else (a, up))
    out = g.call_function(operator.add, (h, a)) if extra_user else h
    g.output(out)
    vals = {"x": torch.randn(1, 1, 8), "wg": torch.randn(12, 8), "wu": torch.randn(12, 8)}
    gm = fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:  # example values as Dynamo records them
        if n.op == "placeholder":
            n.meta["example_value"] = vals[n.name]
        elif n.op == "call_function":
            n.meta["example_value"] = torch.empty(1, 1, 12, requires_grad=requires_grad)
    return gm, vals


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fuses_in_either_operand_order_and_computes_the_same():
    for swap in (False, True):
        gm, vals = _mlp_graph(swap=swap)
        want = gm(**vals)
        gm = fuse_swiglu(gm)
        assert _targets(gm) == [SWIGLU]
        assert torch.equal(gm(**vals), want)


def test_leaves_alone_what_it_must_not_fuse():
    for kw in (dict(extra_user=True), dict(act=F.gelu), dict(requires_grad=True)):
        gm, vals = _mlp_graph(**kw)
        before = _targets(gm)
        assert _targets(fuse_swiglu(gm)) == before, kw
