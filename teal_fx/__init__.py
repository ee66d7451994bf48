"""teal-fx: training-free activation sparsity (TEAL) as a torch.compile backend.

    import teal_fx
    plan = teal_fx.calibrate(model, data, sparsity=0.5)   # graph-level calibration + greedy allocation
    fast = torch.compile(model, backend="teal")            # sparse-GEMV custom ops in the decode graph

Importing this package registers the ``"teal"`` Dynamo backend and the ``teal::*`` ops.
"""
from teal_fx import kernels as kernels  # noqa: F401  (registers torch.ops.teal.*)
from teal_fx.backend import register as _register
from teal_fx.backend import teal_backend
from teal_fx.calibrate import calibrate, read_batch_thresholds, realised_sparsity
from teal_fx.capture import capture_graphs, find_linears
from teal_fx.errors import CalibrationDataError, PlanError
from teal_fx.evaluate import evaluate_perplexity
from teal_fx.generate import decode_logits, generate
from teal_fx.inspect import linear_table
from teal_fx.options import TealOptions
from teal_fx.plan import LinearPlan, Plan
from teal_fx.state import attach_plan, attached_plan, detach_plan

__version__ = "0.1.0"

_register()

__all__ = [
    "calibrate",
    "realised_sparsity",
    "read_batch_thresholds",
    "evaluate_perplexity",
    "generate",
    "decode_logits",
    "Plan",
    "LinearPlan",
    "PlanError",
    "CalibrationDataError",
    "TealOptions",
    "attach_plan",
    "attached_plan",
    "detach_plan",
    "capture_graphs",
    "find_linears",
    "linear_table",
    "teal_backend",
]
