"""``passes/analysis/dataflow.py``'s graph-order query, which the three folds that join two ops around a cache write
use to refuse where a node between them reads the cache."""

from torch import fx

from teal_fx.passes.analysis.dataflow import read_between


def _graph():
    def f(x, cache):
        a = x + 1  # first
        b = cache * 2  # reads the cache
        c = x - 1  # reads only x
        d = a + c  # last
        return d + b

    gm = fx.symbolic_trace(f)
    return gm, {n.name: n for n in gm.graph.nodes}


def test_read_between_sees_only_the_nodes_strictly_between():
    _, n = _graph()
    cache, x = n["cache"], n["x"]
    assert read_between(n["add"], n["add_1"], {cache})  # mul reads it
    assert not read_between(n["add"], n["add_1"], {cache}, skip=[n["mul"]])
    assert not read_between(n["mul"], n["add_1"], {cache})  # first itself is not between
    assert read_between(n["mul"], n["add_1"], {x})  # sub reads x
    assert not read_between(n["sub"], n["add_1"], {x, cache})  # nothing between
    assert not read_between(n["add_1"], n["add"], {cache})  # last before first: runs to the end, finds none
