"""What the passes of one compiled graph share."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import fx

from teal_fx.options import TealOptions
from teal_fx.passes.analysis.discovery import Discovery, MatchedLinear, WeightNames
from teal_fx.plan import Plan

_graph_ids = itertools.count()


@dataclass
class PassContext:
    """Options in, analysis and decisions out: ``label_block_linears`` sets ``discovery``, ``select_plan`` sets
    ``plan`` (None: compile dense), ``insert_sparse_linear`` lists what it rewrote in ``rewritten``."""

    options: TealOptions = field(default_factory=TealOptions)
    plan: Optional[Plan] = None  # given up front (tests), or chosen by select_plan
    resolve_plan: Optional[Callable[[fx.GraphModule, Discovery], Optional[Plan]]] = None  # used when plan is None
    weight_names: Optional[WeightNames] = None  # placeholders of known parameters -> their names (discovery's keys)
    discovery: Optional[Discovery] = None
    rewritten: list[MatchedLinear] = field(default_factory=list)
    graph_id: int = field(default_factory=lambda: next(_graph_ids))
