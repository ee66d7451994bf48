"""The ``teal`` Dynamo backend: discover the block linears, rewrite them to sparse ops, hand the graph on.

    torch.compile(model, backend="teal")                                   # plan attached by teal_fx.calibrate
    torch.compile(model, backend="teal", options={"plan": "plan.json", "dump": "dump/"})
    torch.compile(model, backend="teal", mode="reduce-overhead")          # CUDA graphs through Inductor

The options are ``teal_fx.options.TealOptions``; the passes and their order ``passes/pass_manager.py``; the inner
compile and its Inductor settings ``teal_fx/inductor.py``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx

from teal_fx import state
from teal_fx.inductor import compile_graph
from teal_fx.kernels import sparse_gemv
from teal_fx.options import TealOptions
from teal_fx.passes import Discovery, PassContext, run_passes
from teal_fx.plan import Plan

log = logging.getLogger("teal_fx")


def teal_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                 mode: Optional[str] = None) -> Callable:
    """The Dynamo backend registered as ``"teal"``."""
    opts = TealOptions.parse(options, mode)
    ctx = PassContext(options=opts, resolve_plan=_plan_resolver(example_inputs, opts.plan))
    gm = run_passes(gm, ctx)
    disc = ctx.discovery
    unplaced = [k for k, why in disc.unmatched if "output projection" not in why]
    if disc.problems or (not disc.matched and unplaced):
        warnings.warn(disc.summary(), stacklevel=2)
    else:
        log.info(disc.summary())
    return compile_graph(gm, example_inputs, opts)


def _plan_resolver(example_inputs: list, given: Optional[Plan]) -> Callable[[fx.GraphModule, Discovery], Optional[Plan]]:
    """The plan of a graph: ``given`` (``options["plan"]``), else the one attached to the owner of its weights
    (``teal_fx.state``); with the weights made column-major and the kernels' scratch reserved before any CUDA graph
    is captured. None, with a warning, where there is none."""

    def resolve(gm: fx.GraphModule, discovery: Discovery) -> Optional[Plan]:
        tensors = _placeholder_tensors(gm, example_inputs)
        weights = [tensors.get(m.node.args[1]) for m in discovery.matched]
        weights = [w for w in weights if isinstance(w, torch.Tensor)]
        plan = given if given is not None else state.plan_for_weights(weights)
        if plan is None:
            warnings.warn("teal: no plan for this model (run teal_fx.calibrate(model, ...) or pass options={'plan': "
                          "...}); compiling dense", stacklevel=2)
            return None
        _prepare_weights(weights)
        return plan

    return resolve


def _prepare_weights(weights: list[torch.Tensor]) -> None:
    """Store the matched CUDA weights column-major in place and reserve the sparse GEMV's scratch for them."""
    converted = sum(sparse_gemv.to_column_major_(w) for w in weights)
    if converted:
        log.info("teal: stored %d weights column-major in place; Dynamo recompiles once for the new strides", converted)
    cuda = [w for w in weights if w.is_cuda]
    if cuda:
        sparse_gemv.reserve_workspace(cuda[0].device, max(w.shape[0] for w in cuda), max(w.shape[1] for w in cuda))


def _placeholder_tensors(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, Any]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(phs, example_inputs))


def register() -> None:
    """Register ``"teal"`` with Dynamo unless its entry point is about to do so (no duplicate registration)."""
    from torch._dynamo.backends import registry

    fns = getattr(registry, "_COMPILER_FNS", {})
    pending_entry_point = getattr(registry, "_BACKENDS", {}).get("teal") is not None
    if "teal" in fns or pending_entry_point:
        return
    try:
        registry.register_backend(compiler_fn=teal_backend, name="teal")
    except AssertionError:  # registered meanwhile
        pass
