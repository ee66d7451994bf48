"""The one way a rewrite pass ends: drop what it orphaned, check and recompile the graph, log and count the match."""
from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch._dynamo.utils import counters

log = logging.getLogger("teal_fx.passes")

# What a pass may leave without users and the clean-up may erase: reads and views, never a node that writes
# (``x.index_copy_`` as a ``call_method`` is a KV-cache update, which FX's own purity test would call pure).
_ERASABLE_METHODS = {"expand", "reshape", "view", "unsqueeze", "contiguous", "transpose", "permute", "t", "float", "to"}


def _erasable(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _ERASABLE_METHODS
    if n.op == "call_function":
        return n.target in (operator.getitem, getattr, torch.t) or (
            isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "teal"
            and not n.target._schema.is_mutable)
    return False


def finish(gm: fx.GraphModule, name: str, matched: int, message: str = "", *args: object) -> fx.GraphModule:
    """After a pass that rewrote ``matched`` sites: erase the nodes it left without users (only pure reads, views
    and teal ops), lint, recompile, log ``message % args`` and count ``counters["teal"][name]``. A pass that matched
    nothing leaves the graph untouched."""
    if not matched:
        return gm
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: not _erasable(n))
    gm.graph.lint()
    gm.recompile()
    counters["teal"][name] += matched
    if message:
        log.info("teal: " + message, *args)
    return gm
