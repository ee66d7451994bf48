"""The ordered list of passes and the manager that runs them, dumping the graph before and after."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch import fx

from teal_fx.passes.batch_input_increments import batch_input_increments
from teal_fx.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from teal_fx.passes.fuse_swiglu import fuse_swiglu
from teal_fx.passes.group_shared_input import group_shared_input
from teal_fx.passes.insert_sparse_linear import insert_sparse_linear
from teal_fx.passes.label_block_linears import Discovery, MatchedLinear, label_block_linears
from teal_fx.passes.replace_decode_attention import replace_decode_attention
from teal_fx.passes.select_plan import select_plan

log = logging.getLogger("teal_fx.passes")

Pass = Callable[[fx.GraphModule, "PassContext"], fx.GraphModule]

# The order is the contract: discovery labels the linears, the plan is chosen for (and checked against) what was
# found, the rewrite reads both, the grouping works on the rewritten ops only, and the SwiGLU fusion on the gate/up
# groups; the add + RMSNorm fusion on the single rewritten linears (o, down) that the grouping left. The attention rewrite is independent of the plan (it runs in dense compiles too) and after them, so
# discovery sees the graph as traced; batching the cache counters' increments is independent of everything else.
PASSES: list[Pass] = [label_block_linears, select_plan, insert_sparse_linear, group_shared_input, fuse_swiglu,
                      fuse_add_rmsnorm, replace_decode_attention, batch_input_increments]

_graph_ids = itertools.count()


@dataclass
class PassContext:
    """What the passes share for one compiled graph."""

    plan: Optional[object] = None  # teal_fx.Plan; None after select_plan: compile dense
    plan_resolver: Optional[Callable] = None  # (gm, discovery) -> Plan | None, used when no plan was given
    dump_dir: Optional[Path] = None
    group_shared_input: bool = True  # one launch for q/k/v and one for gate/up (options["group_shared_input"])
    fuse_swiglu: bool = True  # silu(gate) * up formed by the gate/up launch (options["fuse_swiglu"])
    fuse_add_rmsnorm: bool = True  # residual add + RMSNorm in the o/down launch (options["fuse_add_rmsnorm"])
    decode_attention: bool = True  # decode-step sdpa -> teal::decode_attention (options["decode_attention"])
    graph_id: int = field(default_factory=lambda: next(_graph_ids))
    discovery: Optional[Discovery] = None
    rewritten: list[MatchedLinear] = field(default_factory=list)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Optional[list[Pass]] = None) -> fx.GraphModule:
    before = gm.code if ctx.dump_dir else None
    for p in passes if passes is not None else PASSES:
        gm = p(gm, ctx)
    if ctx.dump_dir:
        from teal_fx.inspect import write_dump

        folder = write_dump(Path(ctx.dump_dir) / f"graph_{ctx.graph_id:03d}", before, gm, ctx)
        log.info("teal: wrote graph dump to %s", folder)
    return gm
