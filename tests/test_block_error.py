"""The greedy allocator's block error (teal_fx/block_error.py): candidates run from the accepted row give exactly what
whole runs of the block give, and recompute only what their linear changes."""
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from teal_fx.block_error import BlockError, _mutates
from teal_fx.calibrate import Recorder
from teal_fx.extract_blocks import ThresholdedLinear
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "phi3", "gemma2"]  # GQA, q/k/v biases, fused qkv and gate_up, eager attention + soft-capping


@pytest.fixture(scope="module")
def blocks():
    """Per architecture: the block subgraphs of a tiny model, their cached inputs (two sequences) and histograms."""
    out = {}
    for arch in ARCHS:
        torch._dynamo.reset()
        model = tiny_model(arch)
        recorder = Recorder(model, greedy=True)
        compiled = torch.compile(model, backend=recorder, dynamic=False)
        with torch.no_grad():
            for seed in range(2):
                recorder.keep_next = True
                compiled(input_ids=torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(seed)),
                         use_cache=False)
        (state,) = recorder.graphs
        out[arch] = [(b, [[kept[a] for a in b.inputs] for kept in state.kept], recorder.histograms)
                     for b in state.blocks]
    torch._dynamo.reset()
    return out


def _whole(block, inputs, histograms, error_fraction=0.25):
    error = BlockError(block, inputs, histograms, error_fraction)
    error.incremental = False
    return error


@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(ARCHS), which=st.integers(0, 1), walk=st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from([0.05, 0.1, 0.25, 0.4]), st.booleans()), min_size=1, max_size=12))
def test_runs_from_the_accepted_row_equal_whole_runs(blocks, arch, which, walk):
    """A walk as the greedy search makes it: each step one linear bumped from the accepted row, evaluated, and
    sometimes accepted. Every error is bit for bit the whole block's."""
    block, inputs, hist = blocks[arch][which]
    keys = [m.key for m in block.linears]
    error, whole = BlockError(block, inputs, hist), _whole(block, inputs, hist)
    assert error.incremental
    row = {k: 0.0 for k in keys}
    assert error(row) == whole(row) == 0.0
    for j, bump, take in walk:
        cand = dict(row)
        key = keys[j % len(keys)]
        cand[key] = min(0.95, cand[key] + bump)
        assert error(cand) == whole(cand)
        if take:
            error.accept(cand)
            row = cand
            assert error(row) == whole(row)


def test_a_candidate_runs_only_what_its_linear_changes(blocks):
    """On a Llama block: a bump of down runs the down linear alone; of gate, gate and down; of q, every linear but k
    and v, whose outputs are kept from the accepted row."""
    block, inputs, hist = blocks["llama"][0]
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append(mod.key))
             for m in block.gm.modules() if isinstance(m, ThresholdedLinear)]
    try:
        error = BlockError(block, inputs, hist)
        role = {m.role: m.key for m in block.linears}
        row = {k: 0.0 for k in role.values()}
        for bumped, ran in [("down", ["down"]), ("gate", ["gate", "down"]), ("up", ["up", "down"]),
                            ("q", ["q", "o", "gate", "up", "down"])]:
            calls.clear()
            error({**row, role[bumped]: 0.3})
            assert sorted(calls) == sorted(role[r] for r in ran for _ in inputs), bumped
        calls.clear()
        error.accept({**row, role["up"]: 0.3})  # the chosen candidate runs once more, to keep its values
        assert sorted(calls) == sorted([role["up"], role["down"]] * len(inputs))
    finally:
        for h in hooks:
            h.remove()


def test_nodes_that_write_in_place_are_found():
    """Such a node makes the block run whole (a partial run could write to a kept value); look-alikes do not."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    writes = [g.call_method("add_", (x, y)), g.call_function(torch.relu_, (x,)),
              g.call_function(operator.setitem, (x, 0, y)), g.call_function(operator.iadd, (x, y)),
              g.call_function(torch.nn.functional.silu, (x,), {"inplace": True}),
              g.call_function(torch.ops.aten.add_.Tensor, (x, y))]
    reads = [g.call_function(operator.and_, (x, y)), g.call_method("__getitem__", (x, 0)),
             g.call_method("add", (x, y)), g.call_function(torch.nn.functional.silu, (x,)),
             g.call_function(torch.ops.aten.add.Tensor, (x, y))]
    writes.append(g.call_module("relu", (x,)))  # a submodule is not looked into
    g.output(x)
    fx.GraphModule(torch.nn.ModuleDict({"relu": torch.nn.ReLU(inplace=True)}), g)  # owns the graph
    assert [_mutates(n) for n in writes] == [True] * len(writes)
    assert [_mutates(n) for n in reads] == [False] * len(reads)
