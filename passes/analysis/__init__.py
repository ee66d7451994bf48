"""Analyses the passes share, which never change a graph: data flow over FX nodes, block discovery, and the RMSNorm
pattern (``rmsnorm.py``)."""
from teal_fx.passes.analysis.discovery import (
    Discovery,
    MatchedLinear,
    discover,
    is_tensor_parallel,
    parameter_names,
    unsharded,
    weight_names,
    weight_param,
)

__all__ = ["Discovery", "MatchedLinear", "discover", "is_tensor_parallel", "parameter_names", "unsharded",
           "weight_names", "weight_param"]
