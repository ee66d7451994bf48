"""The plan: JSON round-trip, clear errors for corrupted files and for a plan from another model."""
import json

import pytest
import torch

import teal_fx
from teal_fx.plan import PLAN_VERSION, Plan, PlanError
from tests.conftest import masked_inputs, tiny_model


@pytest.fixture(scope="module")
def llama_linears():
    return teal_fx.find_linears(tiny_model("llama"))


def test_round_trip(tmp_path, llama_linears):
    plan = Plan.from_thresholds(llama_linears, {m.key: 0.1 * i for i, m in enumerate(llama_linears)}, model="tiny")
    path = plan.save(tmp_path / "p.json")
    back = Plan.load(path)
    assert back.linears == plan.linears
    assert back.model == "tiny" and back.prefill_sparse_from == 1.0
    assert json.loads(path.read_text())["version"] == PLAN_VERSION == 3


HIST = {"log2_lo": -24.0, "log2_hi": 16.0, "bins_per_octave": 64, "underflow": 0.0, "overflow": 0.0, "offset": 100,
        "counts": [1, 2]}


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: "not json{",
        lambda d: json.dumps({**d, "format": "something-else"}),
        lambda d: json.dumps({**d, "version": 99}),
        lambda d: json.dumps({**d, "linears": [{"key": "x"}]}),
        lambda d: json.dumps({**d, "linears": [{**d["linears"][0], "threshold": -1}]}),
        lambda d: json.dumps({**d, "linears": [{**d["linears"][0], "role": "mystery"}]}),
        # issue 24, item 5: each of these loaded silently before
        lambda d: json.dumps({**d, "linears": []}),
        lambda d: json.dumps({**d, "linears": [d["linears"][0], d["linears"][0]]}),
        lambda d: json.dumps({**d, "linears": [{**d["linears"][0], "sparsity": 1.5}]}),
        lambda d: json.dumps({**d, "linears": [{**d["linears"][0], "sparsity": -0.1}]}),
        lambda d: json.dumps({**d, "linears": [{**d["linears"][0], "sparsity": float("nan")}]}),
        lambda d: json.dumps({**d, "prefill_sparse_from": float("nan")}),
        lambda d: json.dumps({**d, "prefill_sparse_from": 2.0}),
        lambda d: json.dumps({**d, "target_sparsity": -1}),
        lambda d: json.dumps({**d, "greedy_paths": {"0": [{"x": 1.2}]}}),
        lambda d: json.dumps({**d, "histograms": {"x": {**HIST, "counts": [1, -2]}}}),
        lambda d: json.dumps({**d, "histograms": {"x": {**HIST, "counts": [1, float("nan")]}}}),
        lambda d: json.dumps({**d, "histograms": {"x": {**HIST, "underflow": float("nan")}}}),
    ],
)
def test_corrupted_plan_file(tmp_path, llama_linears, corrupt):
    d = Plan.from_thresholds(llama_linears, 0.2).to_json()
    p = tmp_path / "bad.json"
    p.write_text(corrupt(d))
    with pytest.raises(PlanError):
        Plan.load(p)


def test_save_writes_a_new_file_and_never_through_a_planted_tmp(tmp_path, llama_linears):
    """save wrote ``<path>.tmp`` and renamed it: a symlink planted there redirected the write (issue 24, item 5)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "p.json"
    (tmp_path / "p.json.tmp").symlink_to(victim)
    plan = Plan.from_thresholds(llama_linears, 0.2)
    plan.save(path)
    assert victim.read_text() == "keep me" and not path.is_symlink()
    assert Plan.load(path).linears == plan.linears
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.json.tmp", "victim.txt"]  # no temp left


def test_plan_from_another_model_is_refused(llama_linears):
    plan = Plan.from_thresholds(llama_linears, 0.2, model="llama-64")
    other = tiny_model("llama", hidden=48, heads=4, kv_heads=2)
    with pytest.raises(PlanError, match="does not fit"):
        teal_fx.attach_plan(other, plan)
    deeper = tiny_model("llama", layers=3)
    with pytest.raises(PlanError, match="not in the plan"):
        teal_fx.attach_plan(deeper, plan)
    with pytest.raises(PlanError, match="does not fit"):  # the inspection table too, not a table of dashes
        teal_fx.linear_table(other, plan)
    compiled = torch.compile(other, backend="teal", options={"plan": plan, "compiler": "eager"})
    with pytest.raises(Exception, match="other shapes"):
        compiled(torch.tensor([[3, 4]]), use_cache=False)


def test_attached_plan_is_found_by_bare_compile():
    model = tiny_model("qwen2")
    plan = Plan.from_thresholds(teal_fx.find_linears(model), 50.0)  # masks everything at decode
    teal_fx.attach_plan(model, plan)
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    ids = torch.tensor([[5]])
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    assert not torch.allclose(out, dense)
    teal_fx.detach_plan(model)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="no plan for this model"):
        out = torch.compile(model, backend="teal", options={"compiler": "eager"})(ids, use_cache=False).logits
    torch.testing.assert_close(out, dense)


def test_bad_options():
    model = tiny_model("llama")
    with pytest.raises(Exception, match="compiler"):
        torch.compile(model, backend="teal", options={"compiler": "tvm"})(torch.tensor([[1]]), use_cache=False)
    with pytest.raises(TypeError):
        teal_fx.attach_plan(model, 3.0)


def test_bad_thresholds(llama_linears):
    with pytest.raises(PlanError):
        Plan.from_thresholds(llama_linears, float("nan"))
    with pytest.raises(PlanError, match="no threshold"):
        Plan.from_thresholds(llama_linears, {})


def test_recompiling_with_another_plan_is_not_served_from_the_old_graph():
    """Two torch.compile calls on one model with different plans: Dynamo must not reuse the first graph."""
    model = tiny_model("llama")
    found = teal_fx.find_linears(model)
    ids = torch.tensor([[7]])
    outs = []
    for t in (0.0, 0.8, 0.0):
        plan = Plan.from_thresholds(found, t)
        compiled = torch.compile(model, backend="teal", options={"plan": plan, "compiler": "eager"})
        with torch.no_grad():
            outs.append(compiled(ids, use_cache=False).logits)
        with torch.no_grad(), masked_inputs(model, plan):
            torch.testing.assert_close(outs[-1], model(ids, use_cache=False).logits)
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_a_tensor_parallel_graph_may_hold_a_shard_of_a_planned_weight():
    """A TP rank's graph may show a weight's local shard; only there, and only an equal part along one dimension."""
    from types import SimpleNamespace

    from teal_fx.errors import PlanError
    from teal_fx.plan import LinearPlan, Plan

    plan = Plan(linears={"q.weight": LinearPlan("q.weight", 0, "q", (64, 32), 0.5, 0.1)})
    for shape in [(32, 32), (16, 32), (64, 16)]:
        plan.check_fits([SimpleNamespace(key="q.weight", shape=shape)], require_all=False, shards=True)
        with pytest.raises(PlanError, match="other shapes"):
            plan.check_fits([SimpleNamespace(key="q.weight", shape=shape)], require_all=False)
    for shape in [(32, 16), (48, 32), (128, 32)]:
        with pytest.raises(PlanError, match="other shapes"):
            plan.check_fits([SimpleNamespace(key="q.weight", shape=shape)], require_all=False, shards=True)
