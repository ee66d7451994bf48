"""replace_position_arange: ``arange(1) + counter`` read as a view of the counter, for drawn programs of positions,
writes and aliases of counter inputs (same outputs, same final inputs); what it must leave alone; and the decode
step, where every layer's attention op then takes the shared cos, sin and mask and a view of its layer's counter."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import teal_fx
from teal_fx.passes import replace_position_arange
from tests.conftest import (
    assert_pass_keeps_outputs_and_inputs,
    assert_shared_inputs,
    compiled_through,
    decode_step_attention_inputs,
    tiny_model,
)

COUNTERS = 3


def _program(ops):
    """Per op: ``pos`` forms ``arange(1) + c_i`` and reads it at once, ``late`` forms it and reads it at the end,
    ``inc`` adds to c_i in place (``iadd``: by ``+=``), ``alias`` makes a view of c_i, ``inc_alias`` adds through that view; the result
    sums every position formed, each times 2."""
    def f(x, c0, c1, c2):
        cs, views, positions, acc = (c0, c1, c2), {}, [], x
        for op, i, amount in ops:
            if op == "pos":
                acc = acc + (torch.arange(1) + cs[i]) * 2
            elif op == "late":
                positions.append(torch.arange(1) + cs[i])
            elif op == "inc":
                cs[i].add_(amount)
            elif op == "iadd":  # operator.iadd in the graph, not an ``add_``
                c = cs[i]
                c += amount
            elif op == "alias":
                views[i] = cs[i].view(1)
            elif op == "inc_alias" and i in views:
                views[i].add_(amount)
        for p in positions:
            acc = acc + p * 2
        return acc

    return f


def _counters():
    return [torch.tensor(v) for v in (3, 10, 100)]


def _views(gm):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]


op = st.tuples(st.sampled_from(["pos", "late", "inc", "iadd", "alias", "inc_alias"]), st.integers(0, COUNTERS - 1),
               st.integers(1, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=10))
def test_same_outputs_and_final_inputs(ops):
    assert_pass_keeps_outputs_and_inputs(replace_position_arange, _program(ops), lambda: [torch.tensor([1]), *_counters()])


def test_positions_read_before_any_write_become_views():
    # the decode step's pattern once batch_input_increments has run: every position formed, then the increments
    fn = _program([("pos", 0, 1), ("pos", 1, 1), ("pos", 2, 1), ("inc", 0, 1), ("inc", 1, 1), ("inc", 2, 1)])
    compiled, graphs = compiled_through(replace_position_arange, fn)
    cs = _counters()
    assert torch.equal(compiled(torch.tensor([1]), *cs), torch.tensor([1 + 2 * (3 + 10 + 100)]))
    assert len(_views(graphs[0])) == 3
    assert not [n for n in graphs[0].graph.nodes if n.target is torch.arange]
    assert [int(c) for c in cs] == [4, 11, 101]


@pytest.mark.parametrize("ops", [
    [("late", 0, 1), ("inc", 0, 1)],  # the position is read (by the sum at the end) after its counter's increment
    [("late", 0, 1), ("iadd", 0, 1)],  # ... an increment by ``+=``
    [("alias", 0, 1), ("late", 0, 1), ("inc_alias", 0, 2)],  # ... after a write through a view of it
])
def test_a_write_before_the_last_read_keeps_the_sum(ops):
    compiled, graphs = compiled_through(replace_position_arange, _program(ops))
    cs = _counters()
    assert torch.equal(compiled(torch.tensor([1]), *cs), _program(ops)(torch.tensor([1]), *_counters()))
    assert not _views(graphs[0])


@pytest.mark.parametrize("fn", [
    lambda c: torch.arange(1) + c,  # a graph output: the view would see the caller's later writes
    lambda c: (torch.arange(2) + c) * 1,  # two positions
    lambda c: (torch.arange(1, dtype=torch.int32) + c) * 1,  # another dtype
    lambda c: (torch.arange(1) + c.float()) * 1,  # a float offset
    lambda c: (torch.arange(1) + c.expand(3)) * 1,  # three elements
    lambda c: (torch.arange(1) + c).add_(1) * 1,  # written in place: as a view it would write the counter
    lambda c: (torch.arange(1) + c).view(1, 1) * 1,  # a view of it, which a later write could go through
])
def test_other_sums_are_left_alone(fn):
    compiled, graphs = compiled_through(replace_position_arange, fn)
    c = torch.tensor(7)
    assert torch.equal(compiled(c), fn(torch.tensor(7)))
    assert int(c) == 7
    assert not _views(graphs[0])


def test_decode_step_shares_cos_sin_and_mask_and_reads_each_layers_counter():
    """The decode step through Inductor (CPU): every layer's attention op takes the same cos, sin and mask buffers and
    a view of its own layer's cache counter, so the step's Inductor kernels do not grow with the layers: before, each
    layer's position had a kernel, and cos, sin and the mask were formed again with it."""
    kernels = {}
    for layers in (2, 3):
        model = tiny_model("llama", layers=layers, hidden=128, inter=256)
        teal_fx.attach_plan(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3))
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        per_layer, kernels[layers] = decode_step_attention_inputs(model, ids)
        assert len(per_layer) == layers
        assert_shared_inputs(per_layer)
    assert kernels[2] == kernels[3], kernels
