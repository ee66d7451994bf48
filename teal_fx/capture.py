"""Capture the FX graphs Dynamo makes of a model: the same graphs the ``teal`` backend receives.

Calibration, ``find_linears`` and the inspection table all start here, so the keys and roles they see are the
ones the backend will see when the model is compiled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import fx, nn

from teal_fx.passes.analysis.discovery import Discovery, MatchedLinear, discover, parameter_names, weight_names
from teal_fx.passes.pass_manager import prepare_for_discovery
from teal_fx.tensor_parallel import whole_shape


@dataclass
class CapturedGraph:
    gm: fx.GraphModule
    example_inputs: list
    discovery: Discovery


def discover_captured(gm: fx.GraphModule, example_inputs: list,
                      name_of: Callable[[Any], Optional[str]]) -> tuple[fx.GraphModule, Discovery]:
    """What every reader of a captured graph does first (capture, calibration, the shared-threshold reader): the
    rewrites discovery needs (``prepare_for_discovery``), then discovery, keyed by the weights' identities (``name_of``:
    ``parameter_names(model)``)."""
    gm = prepare_for_discovery(gm)
    return gm, discover(gm.graph, weight_names(gm.graph, example_inputs, name_of))


def recompile_limits(recompiles: int, accumulated: Optional[int] = None, fail: bool = False) -> ContextManager[None]:
    """A ``torch._dynamo.config.patch`` raising Dynamo's recompile limits, for loops that compile the model's
    (shared) forward code again and again. Past the limit Dynamo would run the code uncompiled, silently;
    ``fail=True`` makes it raise instead (where this torch has that switch)."""
    cfg = torch._dynamo.config
    patch = {"recompile_limit": max(recompiles, cfg.recompile_limit)}
    if accumulated is not None:
        patch["accumulated_recompile_limit"] = max(accumulated, cfg.accumulated_recompile_limit)
    if fail and hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return cfg.patch(**patch)


def example_inputs_for(model: nn.Module, tokens: int = 8, batch: int = 1) -> dict:
    """Keyword inputs for a causal LM: random token ids on the model's device, no KV cache."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise TypeError(
            f"{type(model).__name__} has no config.vocab_size: teal_fx expects a Hugging Face causal LM "
            "(or pass example inputs explicitly)"
        )
    device = next(model.parameters()).device
    return {"input_ids": torch.randint(0, vocab, (batch, tokens), device=device), "use_cache": False}


def capture_graphs(
    model: nn.Module,
    inputs: Optional[dict] = None,
    *,
    runner: Optional[Callable[[fx.GraphModule], Callable]] = None,
) -> tuple[list[CapturedGraph], Any]:
    """Run ``model(**inputs)`` under Dynamo and return every graph it made with its discovery, and the output.

    ``runner(gm)`` chooses what executes each graph (default: the graph itself); calibration passes an FX
    interpreter here.
    """
    inputs = example_inputs_for(model) if inputs is None else inputs
    graphs: list[CapturedGraph] = []
    name_of = parameter_names(model)

    def backend(gm: fx.GraphModule, example_inputs):
        gm, discovery = discover_captured(gm, example_inputs, name_of)
        graphs.append(CapturedGraph(gm, list(example_inputs), discovery))
        return runner(gm) if runner is not None else gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=False)
    # A capture is one more compile of the model's (shared) forward code: do not let earlier ones push it past
    # Dynamo's recompile limit, which would silently run it uncaptured.
    with torch.no_grad(), recompile_limits(1024, 4096):
        out = compiled(**inputs)
    if not graphs:
        raise RuntimeError(f"Dynamo produced no graph for {type(model).__name__}; it cannot be analysed")
    return graphs, out


def find_linears(model: nn.Module, inputs: Optional[dict] = None) -> list[MatchedLinear]:
    """The block linears teal would sparsify in ``model``, found by structure on its captured graph(s)."""
    graphs, _ = capture_graphs(model, inputs)
    found: dict[str, MatchedLinear] = {}
    for cg in graphs:
        for m in cg.discovery.matched:
            found.setdefault(m.key, replace(m, shape=whole_shape(model, m.key, m.shape)))  # TP: the unsharded shape
    return sorted(found.values(), key=lambda m: (m.block, m.node.name))

