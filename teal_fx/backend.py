"""The ``teal`` Dynamo backend: discover the block linears, rewrite them to sparse ops, hand the graph on.

    torch.compile(model, backend="teal")                                   # plan attached by teal_fx.calibrate
    torch.compile(model, backend="teal", options={"plan": "plan.json", "dump": "dump/"})
    torch.compile(model, backend="teal", mode="reduce-overhead")          # CUDA graphs through Inductor

The options are ``teal_fx.options.TealOptions``; the passes and their order ``passes/pass_manager.py``; the inner
compile and its Inductor settings ``teal_fx/inductor.py``.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch._dynamo.utils import counters

from teal_fx import state
from teal_fx.inductor import compile_graph
from teal_fx.kernels import sparse_gemv
from teal_fx.kernels.quantize import logical_shape
from teal_fx.options import TealOptions
from teal_fx.passes import Discovery, PassContext, run_passes
from teal_fx.passes.analysis import is_tensor_parallel, weight_names, weight_param
from teal_fx.passes.analysis.dataflow import transposed_input
from teal_fx.plan import Plan

log = logging.getLogger("teal_fx")


def teal_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                 mode: Optional[str] = None) -> Callable:
    """The Dynamo backend registered as ``"teal"``."""
    return _PlanKeyedGraph(gm, TealOptions.parse(options, mode)).compile_first(example_inputs)


class _PlanKeyedGraph:
    """One captured graph, compiled once per plan. At each call the plan that applies is looked up (the plan of the
    model owning the weights it is called with, or ``options["plan"]``, read again if its file changed) and the
    variant compiled for exactly that plan runs; another plan compiles another variant from the graph as captured.

    Why: Dynamo serves one compiled graph to every model of a class whose tensors pass its guards (parameters are
    graph inputs, not constants), and goes on serving it after a plan is attached, replaced or detached; the
    thresholds a variant bakes in are its own plan's, so the plan has to be part of the key (docs/design.md,
    "Plans and compiled graphs"). So is the weight's key in that plan: a graph of one layer (traced after a graph
    break) could be served to another layer, whose thresholds differ. Both come from one weak-dictionary read a
    call.
    """

    def __init__(self, gm: fx.GraphModule, opts: TealOptions) -> None:
        self.opts = opts
        self.captured = gm
        self.pristine = _copy_graph(gm)  # the passes rewrite in place
        self.given = opts.plan
        self.stamp = _file_stamp(opts.plan_path)
        self.weight_index: Optional[int] = None  # the placeholder of a matched weight: whose plan applies
        self.variants: dict[tuple, tuple[Optional[Plan], Callable]] = {}  # (id(plan), weight key) -> (plan, compiled)

    def compile_first(self, example_inputs: list) -> Callable:
        plan, compiled = self._compile(self.captured, example_inputs, first=True)
        self.captured = None  # rewritten and compiled: only the pristine copy serves later plans
        if self.weight_index is None:  # no block linear: no plan changes what this graph computes
            return compiled
        self.variants[(id(plan), state.key_of_weight(example_inputs[self.weight_index]))] = (plan, compiled)

        def run(*args: Any) -> Any:
            return self(*args)

        return run

    def __call__(self, *args: Any) -> Any:
        plan, weight_key = self._plan_now(args)
        key = (id(plan), weight_key)
        entry = self.variants.get(key)
        if entry is None or entry[0] is not plan:
            log.info("teal: compiling a graph again for the plan (or the layer) that now applies to it")
            entry = self.variants[key] = (plan, self._compile(_copy_graph(self.pristine), list(args), plan)[1])
        if plan is not None:  # what says a sparse variant ran, compiled now or served from Dynamo's cache (evaluate.py)
            counters["teal"]["sparse_graph_calls"] += 1
        return entry[1](*args)

    def _plan_now(self, args: tuple) -> tuple[Optional[Plan], Optional[str]]:
        """The plan that applies to this call, and the key of the graph's first matched weight in the attached plan."""
        if self.opts.plan_path is not None:
            stamp = _file_stamp(self.opts.plan_path)
            if stamp != self.stamp:
                self.given, self.stamp = Plan.load(self.opts.plan_path), stamp
                log.info("teal: %s changed on disk: using the plan it holds now", self.opts.plan_path)
        attached, weight_key = state.planned_weight(args[self.weight_index])
        return (self.given if self.given is not None else attached), weight_key

    def _compile(self, gm: fx.GraphModule, example_inputs: list, plan: Optional[Plan] = None,
                 first: bool = False) -> tuple[Optional[Plan], Callable]:
        """Rewrite ``gm`` for ``plan`` (the first time: the plan resolved from its weights) and compile it."""

        def resolve(g: fx.GraphModule, discovery: Discovery) -> Optional[Plan]:
            placeholders = [n for n in g.graph.nodes if n.op == "placeholder"]
            tensors = dict(zip(placeholders, example_inputs))
            params = [weight_param(m.node.args[1]) for m in discovery.matched]  # a TP rank's shard: its DTensor
            # each matched weight, and whether the op reads it through a transpose (GPT-2's Conv1D stores [in, out])
            found = [(w, transposed_input(m.node.args[1]) is not None) for m, p in zip(discovery.matched, params)
                     if isinstance(w := tensors.get(p), torch.Tensor)]
            weights = [w for w, _ in found]
            chosen = plan
            if first:
                w0 = params[0]
                self.weight_index = placeholders.index(w0) if w0 in tensors else None
                chosen = self.given if self.given is not None else state.plan_for_weights(weights)
            if chosen is None:
                tp = not weights and is_tensor_parallel(g.graph)
                warnings.warn("teal: a tensor-parallel graph whose linears read their weights in a form teal does not "
                              "trace back to the parameters; compiling dense" if tp else
                              "teal: no plan for this model (run teal_fx.calibrate(model, ...) or pass options={'plan': "
                              "...}); compiling dense", stacklevel=2)
                return None
            _prepare_weights([w.t() if transposed else w for w, transposed in found])  # as the ops read them
            return chosen

        ctx = PassContext(options=self.opts, resolve_plan=resolve,
                          weight_names=weight_names(gm.graph, example_inputs, state.key_of_weight))
        gm = run_passes(gm, ctx)
        if first:
            disc = ctx.discovery
            unplaced = [k for k, why in disc.unmatched if "output projection" not in why]
            if disc.problems or (not disc.matched and unplaced):
                warnings.warn(disc.summary(), stacklevel=2)
            else:
                log.info(disc.summary())
        return ctx.plan, compile_graph(gm, example_inputs, self.opts)


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata copied shallowly, submodules shared), keeping
    what AOTAutograd reads to tell static inputs (parameters, buffers, the KV cache Dynamo marked static) from the
    rest: ``_param_name_to_source`` on the module and ``_dynamo_source`` on each placeholder. Without them a
    variant compiled for a later plan saw its cache mutations as mutated inputs and lost its CUDA graph
    (int8 at 0% after a first plan: 32.6 tok/s; docs/perf-log.md v24)."""
    graph = fx.Graph()
    copies: dict = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    for old, new in copies.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return out


def _file_stamp(path: Optional[Path]) -> Optional[tuple]:
    """What says a file changed: its inode, size and modification time (None: no file given)."""
    if path is None:
        return None
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _prepare_weights(weights: list[torch.Tensor]) -> None:
    """Reserve the sparse GEMV's scratch for the matched CUDA weights (before any CUDA graph is captured).

    The backend never moves a weight to the column-major layout itself: Dynamo builds a frame's guards after its
    backend returns and refuses a parameter whose strides changed meanwhile (torch 2.11: "Guard failed on the same
    frame it was created"), and graphs compiled earlier for the old strides would then run on the new ones.
    ``attach_plan`` (and ``evaluate_perplexity``) move them before compiling; row-major weights are correct, only
    slower (no grouped launches), and are reported once."""
    cuda = [w for w in weights if w.is_cuda]
    if not cuda:
        return
    shapes = [logical_shape(w) for w in cuda]  # a packed int4 weight holds two outputs a row
    sparse_gemv.reserve_workspace(cuda[0].device, max(n for n, _ in shapes), max(k for _, k in shapes))
    global _warned_layout
    row_major = sum(sparse_gemv.needs_column_major(w) for w in cuda)
    if row_major and not _warned_layout:
        _warned_layout = True
        warnings.warn(f"teal: {row_major} planned weights are row-major, so the sparse GEMV reads them strided and "
                      "launches q/k/v and gate/up apart (correct, slower): call teal_fx.attach_plan(model, plan) "
                      "before torch.compile, which stores them column-major", stacklevel=2)


_warned_layout = False


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
