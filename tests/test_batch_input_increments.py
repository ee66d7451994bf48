"""batch_input_increments: the graph computes the same outputs and leaves the inputs with the same values, for drawn
programs of reads, increments and aliases of counter inputs; the decode step's counters end in one foreach call."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teal_fx.passes import batch_input_increments
from tests.conftest import assert_pass_keeps_outputs_and_inputs, compiled_through

COUNTERS = 3


def _program(ops):
    def f(x, c0, c1, c2):
        cs, views, acc = (c0, c1, c2), {}, x
        for op, i, amount in ops:
            if op == "read":
                acc = acc + cs[i]
            elif op == "inc":
                cs[i].add_(amount)
            elif op == "alias":
                views[i] = cs[i].view(1)
            elif op == "read_alias" and i in views:
                acc = acc + views[i]
        return acc * 1

    return f


def _counters():
    return [torch.tensor(v) for v in (3, 10, 100)]


op = st.tuples(st.sampled_from(["read", "inc", "alias", "read_alias"]), st.integers(0, COUNTERS - 1),
               st.integers(1, 3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=10))
def test_same_outputs_and_final_inputs(ops):
    assert_pass_keeps_outputs_and_inputs(batch_input_increments, _program(ops), lambda: [torch.tensor([1]), *_counters()])


def _foreach_and_adds(gm):
    nodes = list(gm.graph.nodes)
    foreach = [n for n in nodes if n.target is torch._foreach_add_]
    adds = [n for n in nodes if n.target in ("add_", torch.Tensor.add_)]
    return foreach, adds


def test_counters_read_then_incremented_become_one_foreach_at_the_end():
    # the pattern of a static cache in a decode step: each layer reads its counter, then increments it
    fn = _program([("read", 0, 1), ("inc", 0, 1), ("read", 1, 1), ("inc", 1, 1), ("read", 2, 1), ("inc", 2, 1)])
    compiled, graphs = compiled_through(batch_input_increments, fn)
    cs = _counters()
    compiled(torch.tensor([1]), *cs)
    foreach, adds = _foreach_and_adds(graphs[0])
    assert len(foreach) == 1 and not adds and len(foreach[0].args[0]) == 3
    assert list(graphs[0].graph.nodes)[-2] is foreach[0]  # just before the output
    assert [int(c) for c in cs] == [4, 11, 101]


def test_a_read_after_the_increment_keeps_it_in_place():
    # counter 1 is read after its increment, directly or through a view made before it: it must stay where it is
    for ops in ([("inc", 0, 1), ("inc", 1, 1), ("read", 1, 1), ("inc", 2, 1)],
                [("alias", 1, 1), ("inc", 0, 1), ("inc", 1, 1), ("read_alias", 1, 1), ("inc", 2, 1)]):
        compiled, graphs = compiled_through(batch_input_increments, _program(ops))
        compiled(torch.tensor([1]), *_counters())
        foreach, adds = _foreach_and_adds(graphs[0])
        assert len(foreach) == 1 and len(foreach[0].args[0]) == 2
        assert len(adds) == 1 and "c1" in adds[0].args[0].name
