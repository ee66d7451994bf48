"""Graph passes of the teal backend and the manager that runs them (``pass_manager.PASSES``, in order).

Each pass is a plain function ``(gm, ctx) -> gm`` in a file named by what it does, stating its Why and Invariants;
``analysis/`` holds what they read and never change a graph with (data flow, block discovery); every rewrite ends
through ``finish`` (dead code, lint, recompile, log, ``torch._dynamo.utils.counters["teal"]``).
"""
from teal_fx.passes.analysis import Discovery, MatchedLinear, discover
from teal_fx.passes.batch_input_increments import batch_input_increments
from teal_fx.passes.context import PassContext
from teal_fx.passes.fold_qkv_finish_into_attention import fold_qkv_finish_into_attention
from teal_fx.passes.fold_swiglu_into_down import fold_swiglu_into_down
from teal_fx.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from teal_fx.passes.fuse_swiglu import fuse_swiglu
from teal_fx.passes.group_shared_input import group_shared_input
from teal_fx.passes.insert_sparse_linear import insert_sparse_linear
from teal_fx.passes.label_block_linears import label_block_linears
from teal_fx.passes.pass_manager import PASSES, passes_for, prepare_for_discovery, run_passes
from teal_fx.passes.replace_decode_attention import replace_decode_attention
from teal_fx.passes.replace_outer_product_matmul import replace_outer_product_matmul
from teal_fx.passes.replace_position_arange import replace_position_arange
from teal_fx.passes.rewrite_matmul_as_linear import rewrite_matmul_as_linear
from teal_fx.passes.select_plan import select_plan

__all__ = [
    "PASSES",
    "PassContext",
    "passes_for",
    "run_passes",
    "prepare_for_discovery",
    "rewrite_matmul_as_linear",
    "label_block_linears",
    "select_plan",
    "insert_sparse_linear",
    "group_shared_input",
    "fuse_swiglu",
    "fuse_add_rmsnorm",
    "fold_swiglu_into_down",
    "replace_decode_attention",
    "fold_qkv_finish_into_attention",
    "replace_outer_product_matmul",
    "batch_input_increments",
    "replace_position_arange",
    "discover",
    "Discovery",
    "MatchedLinear",
]
