"""The ordered list of passes, what turns each on, and the manager that runs them, dumping the graph before/after.

The order is the contract:
0. ``BEFORE_DISCOVERY`` (``rewrite_matmul_as_linear``) puts linears in the one form discovery reads; calibration and
   capture run these too (``prepare_for_discovery``), so every reader of a model sees the same linears and keys;
1. ``label_block_linears`` (analysis) labels the block linears;
2. ``select_plan`` (analysis) chooses the plan for, and checks it against, what was found;
3. ``insert_sparse_linear`` rewrites the labelled linears with the plan's thresholds;
4. ``group_shared_input`` works on the rewritten ops only, ``fuse_swiglu`` on its gate/up groups,
   ``fuse_add_rmsnorm`` on the single rewritten linears (o, down) that grouping left, ``fold_swiglu_into_down``
   on what those two made of an MLP, and ``fold_rope_into_qkv_finish`` on the q/k/v groups (it reads their q/k/v
   labels);
5. ``replace_decode_attention`` is independent of the plan (it runs in dense compiles too) and comes after them, so
   discovery sees the graph as traced; ``fold_qkv_finish_into_attention`` then joins its result to the q/k/v op,
   and ``fold_attention_merge_into_o`` that to o's add + RMSNorm op;
   ``replace_outer_product_matmul`` and ``batch_input_increments`` are independent of everything else (last, so no
   analysis sees a matmul turned into a multiply); ``replace_position_arange`` after the increments, which it needs
   at the end of the graph.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from torch import fx

from teal_fx.options import TealOptions
from teal_fx.passes.batch_input_increments import batch_input_increments
from teal_fx.passes.context import PassContext
from teal_fx.passes.dump import write_dump
from teal_fx.passes.fold_attention_merge_into_o import fold_attention_merge_into_o
from teal_fx.passes.fold_qkv_finish_into_attention import fold_qkv_finish_into_attention
from teal_fx.passes.fold_rope_into_qkv_finish import fold_rope_into_qkv_finish
from teal_fx.passes.fold_swiglu_into_down import fold_swiglu_into_down
from teal_fx.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from teal_fx.passes.fuse_swiglu import fuse_swiglu
from teal_fx.passes.group_shared_input import group_shared_input
from teal_fx.passes.insert_sparse_linear import insert_sparse_linear
from teal_fx.passes.label_block_linears import label_block_linears
from teal_fx.passes.replace_decode_attention import replace_decode_attention
from teal_fx.passes.replace_outer_product_matmul import replace_outer_product_matmul
from teal_fx.passes.replace_position_arange import replace_position_arange
from teal_fx.passes.rewrite_matmul_as_linear import rewrite_matmul_as_linear
from teal_fx.passes.select_plan import select_plan

log = logging.getLogger("teal_fx.passes")

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

# canonical forms every reader of a graph needs before discovery (the backend, calibration, capture)
BEFORE_DISCOVERY: list[Pass] = [rewrite_matmul_as_linear]

# (pass, the TealOptions flag that turns it on; None: always runs)
PASSES: list[tuple[Pass, Optional[str]]] = [
    *((p, None) for p in BEFORE_DISCOVERY),
    (label_block_linears, None),
    (select_plan, None),
    (insert_sparse_linear, None),
    (group_shared_input, "group_shared_input"),
    (fuse_swiglu, "fuse_swiglu"),
    (fuse_add_rmsnorm, "fuse_add_rmsnorm"),
    (fold_swiglu_into_down, "fold_swiglu"),
    (fold_rope_into_qkv_finish, "fold_rope"),
    (replace_decode_attention, "decode_attention"),
    (fold_qkv_finish_into_attention, "fold_qkv_attention"),
    (fold_attention_merge_into_o, "fold_attention_merge"),
    (replace_outer_product_matmul, "outer_product_multiply"),
    (batch_input_increments, None),
    (replace_position_arange, None),
]


def prepare_for_discovery(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the ``BEFORE_DISCOVERY`` rewrites done, for a reader that discovers without the other passes."""
    for p in BEFORE_DISCOVERY:
        gm = p(gm, None)
    return gm


def passes_for(options: TealOptions) -> list[Pass]:
    """The passes that run under ``options``, in order."""
    return [p for p, flag in PASSES if flag is None or getattr(options, flag)]


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run ``passes_for(ctx.options)`` on ``gm``; with ``options.dump``, write the graph before and after."""
    before = gm.code if ctx.options.dump else None
    for p in passes_for(ctx.options):
        gm = p(gm, ctx)
    if ctx.options.dump:
        folder = write_dump(Path(ctx.options.dump) / f"graph_{ctx.graph_id:03d}", before, gm, ctx)
        log.info("teal: wrote graph dump to %s", folder)
    return gm
