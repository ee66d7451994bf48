"""A compiled graph is keyed on the exact plan it baked in: never another model's thresholds, never a plan that was
replaced, detached, or rewritten on disk (issue 24, items 1-2)."""
import functools

import pytest
import torch

import teal_fx
from tests.conftest import masked_inputs, tiny_model

# one backend object for every compile, as torch.compile(model, backend="teal") gives: Dynamo then serves a graph
# compiled for one model to another model of the same class, which is what these tests are about
EAGER_TEAL = functools.partial(teal_fx.teal_backend, options={"compiler": "eager"})
IDS = torch.tensor([[5], [9]])  # one token per sequence: a decode step, sparsified


def _plan(model, t):
    return teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), t)


def _logits(run, model):
    with torch.no_grad():
        return run(IDS, use_cache=False).logits


def _reference(model, plan):
    with torch.no_grad(), masked_inputs(model, plan, sparse_from=0.0):
        return model(IDS, use_cache=False).logits


def test_two_models_of_one_class_each_run_their_own_plan():
    torch._dynamo.reset()
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    plan_a, plan_b = _plan(a, 0.05), _plan(b, 0.9)
    teal_fx.attach_plan(a, plan_a)
    teal_fx.attach_plan(b, plan_b)
    fa, fb = torch.compile(a, backend=EAGER_TEAL), torch.compile(b, backend=EAGER_TEAL)
    for _ in range(2):  # and again, alternating
        torch.testing.assert_close(_logits(fa, a), _reference(a, plan_a))
        torch.testing.assert_close(_logits(fb, b), _reference(b, plan_b))


def test_the_lean_loop_of_two_models_runs_their_own_plans():
    torch._dynamo.reset()
    a, b = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=2)
    plans = {id(a): _plan(a, 0.0), id(b): _plan(b, 0.9)}
    ids = torch.randint(3, 128, (1, 5))
    for m in (a, b):
        teal_fx.attach_plan(m, plans[id(m)])
    for m in (a, b, a):
        out = teal_fx.generate(m, ids, 6, eos_token_id=-1, backend=EAGER_TEAL)
        with masked_inputs(m, plans[id(m)], sparse_from=1.0):
            assert torch.equal(out, teal_fx.generate(m, ids, 6, eos_token_id=-1, backend="none"))


def test_a_plan_attached_after_compiling_is_used_and_a_detached_one_is_not():
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=EAGER_TEAL)
    dense = _logits(model, model)
    with pytest.warns(UserWarning, match="no plan"):
        torch.testing.assert_close(_logits(compiled, model), dense)
    plan = _plan(model, 0.9)
    teal_fx.attach_plan(model, plan)
    torch.testing.assert_close(_logits(compiled, model), _reference(model, plan))
    teal_fx.detach_plan(model)
    torch.testing.assert_close(_logits(torch.compile(model, backend=EAGER_TEAL), model), dense)
    torch.testing.assert_close(_logits(compiled, model), dense)


def test_a_plan_file_rewritten_after_compiling_is_read_again(tmp_path):
    torch._dynamo.reset()
    model = tiny_model("llama")
    path = tmp_path / "plan.json"
    low, high = _plan(model, 0.05), _plan(model, 0.9)
    low.save(path)
    compiled = torch.compile(model, backend="teal", options={"plan": str(path), "compiler": "eager"})
    torch.testing.assert_close(_logits(compiled, model), _reference(model, low))
    high.save(path)
    torch.testing.assert_close(_logits(compiled, model), _reference(model, high))
