"""Putting a model's weights in the format a plan runs with (``Plan.weights``, ``Plan.lm_head``).

Calibration with ``weights="int8" | "int4"`` quantizes before it records, so the thresholds are those of the
quantized model's activations; attaching such a plan to a float model quantizes it the same way. The formats and the
module that holds them are in kernels/quantize.py.
"""
from __future__ import annotations

import gc
from typing import Optional

import torch
from torch import nn

from teal_fx.errors import PlanError
from teal_fx.kernels.quantize import QuantizedLinear, model_weight_format, quantize_linears_


def output_head_key(model: nn.Module) -> Optional[str]:
    """The weight key of the model's output head (``lm_head.weight``), or None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def apply_weight_format(model: nn.Module, keys: list[str], weights: Optional[str], lm_head: Optional[str]) -> int:
    """Quantize the block linears ``keys`` to ``weights`` (and the output head to ``lm_head``), in place, one matrix
    at a time; already in that format: nothing to do. A model whose linears or head are in another format is a
    ``PlanError``, raised before anything is quantized (the plan's thresholds were calibrated on other activations).
    Returns how many were quantized."""
    have = model_weight_format(model, keys)
    if have != weights and have is not None:
        raise PlanError(f"the model's block linears are {have}, but the plan runs them as {weights or 'float'}: load "
                        "the model again (unquantized) or calibrate a plan for this format")
    head = output_head_key(model)
    head_module = model.get_submodule(head.rpartition(".")[0]) if head is not None else None
    have_head = head_module.format if isinstance(head_module, QuantizedLinear) else None
    if lm_head is not None and head is None:
        raise PlanError("the plan quantizes the output head, but the model has none (get_output_embeddings)")
    if weights is None and lm_head is None:
        return 0
    if have_head is not None and have_head != lm_head:
        raise PlanError(f"the model's output head is already quantized to {have_head}, not {lm_head} as the plan has it"
                        if lm_head else "the model's output head is quantized, but the plan keeps it as it is")
    # graphs Dynamo captured of this model (find_linears, an earlier compile) hold its float weights: drop them, or
    # quantizing adds the int8/int4 copies to the float ones instead of replacing them (measured on the H200: 15.0 GiB
    # became 21.6 before this reset). They would have to recompile for the new modules anyway.
    torch._dynamo.reset()
    done = quantize_linears_(model, keys, weights) if weights is not None else 0
    if lm_head is not None:
        done += quantize_linears_(model, [head], lm_head)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return done
