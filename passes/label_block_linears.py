"""Analysis pass: label every block linear of the graph with its block and role (``analysis/discovery.py``).

Invariants: the graph is not changed; each matched linear gets ``node.meta["teal"] = MatchedLinear``; the result is
``ctx.discovery`` (and ``gm.meta["teal_discovery"]``), which every later pass reads instead of matching again.
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import fx

from teal_fx.passes.analysis.discovery import discover
from teal_fx.passes.context import PassContext

log = logging.getLogger("teal_fx.passes")


def label_block_linears(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    result = discover(gm.graph, ctx.weight_names if ctx is not None else None)
    gm.meta["teal_discovery"] = result
    for m in result.matched:
        log.debug("teal: matched block %d %s %s %s", m.block, m.role, m.key, m.shape)
    for note in result.notes:
        log.warning("teal: %s", note)
    if ctx is not None:
        ctx.discovery = result
    return gm
