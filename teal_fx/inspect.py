"""Inspection without compiling: the table of the block linears teal finds in a model, with a plan's sparsities."""
from __future__ import annotations

from typing import Optional

from torch import nn

from teal_fx.capture import find_linears
from teal_fx.plan import Plan, found_table
from teal_fx.state import attached_plan


def linear_table(model: nn.Module, plan: Optional[Plan] = None, inputs: Optional[dict] = None) -> str:
    """The matched linears of ``model`` (block, role, key, shape) with the plan's sparsity and threshold if any.

    Needs no compilation of the model: the graph is captured and analysed, nothing is rewritten. A plan that does not
    fit the model raises ``PlanError`` with what differs, rather than a table of dashes.
    """
    found = find_linears(model, inputs)
    plan = plan if plan is not None else attached_plan(model)
    if plan is not None:
        plan.check_fits(found)
    return found_table(found, plan)
