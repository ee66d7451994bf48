"""The pass manager and what every pass shares: the options that turn passes on, the one way a rewrite ends."""
import dataclasses
import operator

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

from teal_fx.options import TealOptions
from teal_fx.passes import PASSES, passes_for
from teal_fx.passes.finish import finish


def test_options_pick_the_passes_and_keep_their_order():
    everything = [p for p, _ in PASSES]
    assert passes_for(TealOptions()) == everything  # every pass is on by default
    assert [p.__name__ for p in passes_for(TealOptions(fold_qkv_attention=False))] == \
        [p.__name__ for p in everything if p.__name__ != "fold_qkv_finish_into_attention"]
    assert [p.__name__ for p in passes_for(TealOptions(fold_attention_merge=False))] == \
        [p.__name__ for p in everything if p.__name__ != "fold_attention_merge_into_o"]
    assert [p.__name__ for p in passes_for(TealOptions(fold_rope=False))] == \
        [p.__name__ for p in everything if p.__name__ != "fold_rope_into_qkv_finish"]
    off = TealOptions(fuse_swiglu=False, decode_attention=False)
    assert [p.__name__ for p in passes_for(off)] == [p.__name__ for p in everything
                                                     if p.__name__ not in ("fuse_swiglu", "replace_decode_attention")]
    assert all(flag is None or hasattr(TealOptions, flag) for _, flag in PASSES)


def test_options_are_parsed_once_into_a_frozen_value():
    opts = TealOptions.parse({"fuse_swiglu": False, "max_autotune": True}, mode="reduce-overhead")
    assert opts.fuse_swiglu is False and opts.mode == "reduce-overhead" and dict(opts.inductor) == {"max_autotune": True}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.fuse_swiglu = True
    with pytest.raises(TypeError):
        opts.inductor["x"] = 1
    with pytest.raises(ValueError, match="compiler"):
        TealOptions.parse({"compiler": "tvm"})
    with pytest.raises(ValueError, match="unknown options"):
        TealOptions.parse({"compiler": "eager", "max_autotune": True})


def test_finish_erases_orphaned_views_but_never_an_in_place_write():
    """FX's own purity test calls every ``call_method`` pure, so ``cache.add_(1)`` (a KV-cache write) would go;
    the clean-up erases only reads, views and teal ops that nothing uses."""
    g = fx.Graph()
    x = g.placeholder("x")
    cache = g.placeholder("cache")
    g.call_method("add_", (cache, 1))  # in place, result unused: must stay
    view = g.call_method("reshape", (x, (-1,)))  # orphaned by a rewrite: may go
    g.call_function(operator.getitem, (view, 0))
    g.output(g.call_function(torch.relu, (x,)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    before = counters["teal"]["test_rewrite"]
    gm = finish(gm, "test_rewrite", 2, "%d sites", 2)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert targets == ["add_", torch.relu]
    assert counters["teal"]["test_rewrite"] == before + 2
    c = torch.zeros(1)
    gm(torch.ones(2), c)
    assert c.item() == 1.0


def test_finish_leaves_a_graph_without_matches_alone():
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_method("reshape", (x, (-1,)))
    g.output(x)
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert len(finish(gm, "nothing", 0).graph.nodes) == 3
