"""teal_fx.state, the one owner of per-model state: nothing written onto the user's model, nothing kept alive."""
import gc
import weakref

import torch

import teal_fx
from teal_fx import state
from tests.conftest import tiny_model


def test_attach_writes_nothing_onto_the_model_and_detach_forgets_it():
    model = tiny_model("llama")
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3)  # a capture: torch marks the model once
    before = dict(vars(model))
    teal_fx.attach_plan(model, plan)
    teal_fx.generate(model, torch.randint(3, 128, (1, 4)), 2, eos_token_id=-1, options={"compiler": "eager"})
    assert vars(model).keys() == before.keys() and not any(k.startswith("_teal") for k in vars(model))
    assert teal_fx.attached_plan(model) is plan
    weights = [model.get_parameter(k) for k in plan.linears]
    assert state.plan_for_weights(weights) is plan
    teal_fx.detach_plan(model)
    assert teal_fx.attached_plan(model) is None and state.plan_for_weights(weights) is None


def test_a_deleted_model_is_freed_with_its_wrappers_and_cache():
    """The lean loop's compiled wrapper and static cache are held for the model, weakly: deleting the model frees it
    (a wrapper holding its model would keep it alive through the table that holds the wrapper)."""
    model = tiny_model("llama")
    teal_fx.attach_plan(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3), check=False)
    teal_fx.generate(model, torch.randint(3, 128, (1, 4)), 3, eos_token_id=-1, options={"compiler": "eager"})
    assert state.held_kv_cache(model) is not None
    ref = weakref.ref(model)
    del model
    torch._dynamo.reset()  # Dynamo's own caches guard on the model; the test is about ours
    gc.collect()
    assert ref() is None


def test_a_wrapper_is_made_anew_when_another_plan_is_attached():
    model = tiny_model("llama")
    made = []
    make = lambda: made.append(object()) or made[-1]
    first = state.compiled_wrapper(model, "k", make)
    assert state.compiled_wrapper(model, "k", make) is first
    teal_fx.attach_plan(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3), check=False)
    assert state.compiled_wrapper(model, "k", make) is not first and len(made) == 2
