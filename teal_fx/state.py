"""The one owner of what teal-fx remembers about a user's model between calls.

* the plan attached to a model (``attach_plan`` / ``detach_plan`` / ``attached_plan``), and which plan each of its
  weights belongs to: Dynamo hands the backend the parameters themselves as example inputs, which is how a bare
  ``torch.compile(model, backend="teal")`` finds its plan (``plan_for_weights``);
* the lean decode loop's compiled wrappers, static KV caches and greedy-step buffers (``compiled_wrapper``,
  ``static_kv_cache``, ``decode_step_buffers``).

Everything is keyed weakly by the model (or weight): nothing is written onto the user's model, and nothing here keeps
a deleted model alive (the values never refer to their model: a wrapper is compiled around ``nn.Module.__call__`` and
takes the model as its first argument).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Hashable, Iterable, Optional

from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from teal_fx.capture import find_linears
from teal_fx.kernels.quantize import stored_in_by_out
from teal_fx.kernels.sparse_gemv import local_tensor, to_column_major_
from teal_fx.plan import Plan, PlanLike, as_plan
from teal_fx.weights import apply_weight_format

_PLAN_OF_MODEL: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()
# weight tensor -> (the plan of the model it belongs to, its key in that plan)
_PLANNED_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()
_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # key -> (plan, wrapper)
_KV_CACHES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # (key, cache)
_STEP_BUFFERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # (key, buffers)


def attach_plan(model: nn.Module, plan: PlanLike, *, check: bool = True) -> Plan:
    """Attach ``plan`` to ``model`` so that ``torch.compile(model, backend="teal")`` uses it.

    With ``check`` the model's graph is captured and the plan must fit it exactly (same keys, same shapes). The
    matched weights are stored column-major on CUDA (``to_column_major_``), or, for a plan of int8/int4 weights
    (``plan.weights``), quantized in place. A graph compiled before runs with the plan attached now at its next call
    (the backend keys its compiled variants on the plan).
    """
    plan = as_plan(plan)
    if check:
        plan.check_fits(find_linears(model))
    problem = plan.batch_thresholds_problem(plan.target_sparsity)
    if problem:
        warnings.warn(problem, stacklevel=2)
    apply_weight_format(model, list(plan.linears), plan.weights, plan.lm_head)
    for key, w in zip(plan.linears, store_column_major(model, plan)):
        _PLANNED_WEIGHT[w] = _PLANNED_WEIGHT[local_tensor(w)] = (plan, key)  # a graph may take a TP rank's shard
    _PLAN_OF_MODEL[model] = plan
    return plan


def store_column_major(model: nn.Module, plan: Plan) -> list:
    """The plan's weights of ``model``, stored column-major in place on CUDA (``to_column_major_``): the layout the
    sparse GEMV reads. Done before compiling, never by the backend during a compile (backend._prepare_weights). A
    weight stored [in, out] (GPT-2's Conv1D) already is, seen through the transpose the graph reads it with."""
    weights = []
    for key in plan.linears:
        try:
            w = model.get_parameter(key)
        except AttributeError as e:
            raise ValueError(f"plan key {key!r} is not a parameter of {type(model).__name__}") from e
        if not stored_in_by_out(model.get_submodule(key.rpartition(".")[0])):
            to_column_major_(w)
        weights.append(w)
    return weights


def detach_plan(model: nn.Module) -> None:
    """Forget the plan attached to ``model`` (a new compile then runs dense)."""
    plan = _PLAN_OF_MODEL.pop(model, None)
    if plan is None:
        return
    for key in plan.linears:
        try:
            w = model.get_parameter(key)
        except AttributeError:
            continue
        _PLANNED_WEIGHT.pop(w, None)
        _PLANNED_WEIGHT.pop(local_tensor(w), None)


def attached_plan(model: nn.Module) -> Optional[Plan]:
    """The plan attached to ``model`` by ``calibrate`` or ``attach_plan``, if any."""
    return _PLAN_OF_MODEL.get(model)


def planned_weight(weight: Any) -> tuple[Optional[Plan], Optional[str]]:
    """(the plan attached to the model owning ``weight``, the weight's key in it), or (None, None). The key is the
    weight's qualified name whichever frame Dynamo traced it in (discovery.weight_names). One weak-dictionary read: a
    compiled graph asks this at every call."""
    return _PLANNED_WEIGHT.get(weight, (None, None)) if isinstance(weight, Tensor) else (None, None)


def key_of_weight(weight: Any) -> Optional[str]:
    """The key of ``weight`` in the plan attached to its model (None: none)."""
    return planned_weight(weight)[1]


def plan_for_weights(weights: Iterable[Tensor]) -> Optional[Plan]:
    """The plan attached to the model owning these weights (None: none; an error if they belong to several)."""
    plans = {id(p): p for w in weights if (p := planned_weight(w)[0]) is not None}
    if len(plans) > 1:
        raise ValueError("the linears of this graph belong to models with different attached plans")
    return next(iter(plans.values()), None)


def compiled_wrapper(model: nn.Module, key: Hashable, make: Callable[[], Callable]) -> Callable:
    """The compiled wrapper ``make()`` gave for (``model``, ``key``), made anew when the plan attached to the model
    has changed since (a reference, not an id: ids of freed plans are reused). Correctness does not rest on this (the
    backend keys every compiled graph on its plan); a new wrapper makes the lean loop recompile through Dynamo,
    where its CUDA-graph capture is set up, rather than compile a variant inside a call.
    ``make()`` must not refer to the model: the wrapper is called as ``wrapper(model, **inputs)``."""
    wrappers = _WRAPPERS.setdefault(model, {})
    plan = _PLAN_OF_MODEL.get(model)
    entry = wrappers.get(key)
    if entry is None or entry[0] is not plan:
        entry = wrappers[key] = (plan, make())
    return entry[1]


def static_kv_cache(model: nn.Module, key: Hashable, make: Callable[[], Any]) -> Any:
    """The model's last static KV cache if it was made for ``key`` (reset), else ``make()``'s, which replaces it.

    Reusing the tensors keeps their addresses, which the CUDA graphs of the decode step baked in: a new cache per
    call would make cudagraph trees record the step again on every call."""
    cache, reused = _one_per_model(_KV_CACHES, model, key, make)
    if reused:
        cache.reset()
    return cache


def decode_step_buffers(model: nn.Module, key: Hashable, make: Callable[[], Any]) -> Any:
    """The lean loop's greedy-step buffers for ``model`` if made for ``key``, else ``make()``'s, which replace them.
    Kept for the reason ``static_kv_cache`` keeps caches: the compiled step guards on them and its CUDA graph holds
    their addresses."""
    return _one_per_model(_STEP_BUFFERS, model, key, make)[0]


def _one_per_model(table: "weakref.WeakKeyDictionary[nn.Module, tuple]", model: nn.Module, key: Hashable,
                   make: Callable[[], Any]) -> tuple[Any, bool]:
    """``table``'s value for ``model`` if it was made for ``key`` (and True), else ``make()``'s (and False), which
    replaces it; the old one is dropped before ``make()`` allocates."""
    held = table.get(model)
    if held is not None and held[0] == key:
        return held[1], True
    table.pop(model, None)
    table[model] = held = (key, make())
    return held[1], False


def held_kv_cache(model: nn.Module) -> Optional[Any]:
    """The static KV cache ``static_kv_cache`` holds for ``model`` (None: none)."""
    held = _KV_CACHES.get(model)
    return None if held is None else held[1]
