"""Analysis pass: pick the plan that applies to this graph and check that it fits what discovery found.

Invariants: the graph is not changed. After this pass ``ctx.plan`` is either None (compile dense) or a plan that
holds every matched linear of this graph with the same weight shape (in a tensor-parallel rank's graph, the one with
all-reduces, a weight may also be its shard: the planned shape cut along one dimension); otherwise ``PlanError`` is
raised, never a silent mismatch.
"""
from __future__ import annotations

from torch import fx

from teal_fx.passes.analysis.discovery import is_tensor_parallel
from teal_fx.passes.context import PassContext


def select_plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    disc = ctx.discovery
    if ctx.plan is None and ctx.resolve_plan is not None and disc is not None and disc.matched:
        ctx.plan = ctx.resolve_plan(gm, disc)
    if ctx.plan is not None and disc is not None and disc.matched:
        ctx.plan.check_fits(disc.matched, require_all=False, shards=is_tensor_parallel(gm.graph))
    return gm
