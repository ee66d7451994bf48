"""Quantized models end to end on the CPU: ``calibrate(weights=...)`` quantizes in place and records the format, a
plan of that format quantizes a float model it is attached to, mismatches are errors, and the compiled graph runs
the sparse ops on the quantized weights with the same result as the eager quantized model with masked inputs."""
import json
from dataclasses import replace

import pytest
import torch

import teal_fx
from teal_fx.errors import PlanError
from teal_fx.kernels.quantize import QuantizedLinear, quantize_linears_
from teal_fx.plan import Plan
from tests.conftest import masked_inputs, tiny_model

IDS = torch.tensor([[3], [5], [11]])  # one token a sequence: a decode-shaped graph, which the plan sparsifies
DATA = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(0))


def _quantized_modules(model):
    return {name: m.format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_calibrate_quantizes_in_place_and_the_compiled_graph_matches_the_masked_reference(fmt, tmp_path):
    model = tiny_model("llama")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = teal_fx.calibrate(model, DATA, sparsity=0.4, weights=fmt, progress=False)
    assert plan.weights == fmt and plan.lm_head is None
    quantized = _quantized_modules(model)
    assert len(quantized) == len(plan.linears) and set(quantized.values()) == {fmt}  # the block linears, not lm_head
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < before  # no float copy survives
    ops = torch._dynamo.utils.counters["teal"]
    ops.clear()
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(IDS, use_cache=False).logits
        with masked_inputs(model, plan):
            ref = model(IDS, use_cache=False).logits
    assert ops["linears_rewritten"] == len(plan.linears)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the format survives a save and load (version 3: ``activations``)
    plan.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 3
    assert Plan.load(tmp_path / "p.json").weights == fmt


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_activations_round_the_sparsified_inputs_of_the_compiled_graph(fmt, tmp_path):
    model = tiny_model("llama")
    plan = teal_fx.calibrate(model, DATA, sparsity=0.4, weights=fmt, activations="int8", progress=False)
    assert plan.activations == "int8"
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(IDS, use_cache=False).logits
        with masked_inputs(model, plan):
            ref = model(IDS, use_cache=False).logits
        with masked_inputs(model, replace(plan, activations=None)):
            unrounded = model(IDS, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert float((out - unrounded).norm() / unrounded.norm()) > 1e-4  # the rounding is there (its cost on a trained
    # model: examples/results/smollm2_quantized_wikitext2.md)
    plan.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 3
    assert Plan.load(tmp_path / "p.json").activations == "int8"


def test_int8_activations_need_quantized_weights():
    with pytest.raises(ValueError, match="needs weights"):
        teal_fx.calibrate(tiny_model("llama"), DATA, sparsity=0.3, activations="int8", progress=False)
    with pytest.raises(ValueError, match="activations must be"):
        teal_fx.calibrate(tiny_model("llama"), DATA, sparsity=0.3, weights="int8", activations="fp8", progress=False)
    plan = teal_fx.calibrate(tiny_model("llama"), DATA, sparsity=0.3, method="uniform", progress=False)
    with pytest.raises(PlanError, match="quantized weights"):
        Plan.from_json({**plan.to_json(), "activations": "int8"})
    with pytest.raises(PlanError, match="activations may be"):
        Plan.from_json({**plan.to_json(), "weights": "int8", "activations": "int4"})
    old = plan.to_json()
    old["version"] = 2
    del old["activations"]
    assert Plan.from_json(old).activations is None  # version 2 plans load with their inputs as they are


@pytest.mark.parametrize("weights, head, fmt", [("int8", True, "int8"), ("int4", "int4", "int4"), (None, "int8", "int8")])
def test_attaching_a_quantized_plan_quantizes_a_float_model_and_lm_head(weights, head, fmt):
    """The output head in int8 (``quantize_lm_head=True``) or int4, with the block linears quantized or not."""
    donor = tiny_model("qwen2")  # q/k/v biases
    plan = teal_fx.calibrate(donor, DATA, sparsity=0.5, weights=weights, quantize_lm_head=head, progress=False)
    assert plan.lm_head == fmt and isinstance(donor.lm_head, QuantizedLinear) and donor.lm_head.format == fmt
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).lm_head == fmt
    model = tiny_model("qwen2")
    teal_fx.attach_plan(model, plan)
    assert _quantized_modules(model) == _quantized_modules(donor)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(IDS, use_cache=False).logits
        with masked_inputs(model, plan):
            ref = model(IDS, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_int8_at_zero_sparsity_stays_close_to_float():
    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    teal_fx.calibrate(model, DATA, sparsity=0.0, weights="int8", progress=False)
    with torch.no_grad():
        out = torch.compile(model, backend="teal", options={"compiler": "eager"})(IDS, use_cache=False).logits
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_format_mismatches_are_errors():
    model = tiny_model("llama")
    plan = teal_fx.calibrate(model, DATA, sparsity=0.3, progress=False)  # float weights
    other = tiny_model("llama")
    quantize_linears_(other, list(plan.linears), "int4")
    with pytest.raises(PlanError, match="int4"):
        teal_fx.attach_plan(other, plan)
    with pytest.raises(PlanError, match="int4"):
        teal_fx.attach_plan(other, plan.__class__(**{**plan.__dict__, "weights": "int8"}))
    with pytest.raises(ValueError, match="weights must be"):
        teal_fx.calibrate(tiny_model("llama"), DATA, weights="int3", progress=False)
    with pytest.raises(ValueError, match="quantize_lm_head must be"):
        teal_fx.calibrate(tiny_model("llama"), DATA, weights="int8", quantize_lm_head="fp8", progress=False)
    with pytest.raises(PlanError, match="lm_head"):
        Plan.from_json({**plan.to_json(), "lm_head": "int2"})
    head_int8 = teal_fx.calibrate(tiny_model("llama"), DATA, sparsity=0.3, weights="int8", quantize_lm_head=True,
                                  progress=False)
    other = tiny_model("llama")
    teal_fx.attach_plan(other, head_int8)
    with pytest.raises(ValueError, match="already quantized to int8, not int4"):  # a plan whose head is int4
        teal_fx.attach_plan(other, replace(head_int8, lm_head="int4"))
    with pytest.raises(PlanError, match="weight format"):
        Plan.from_json({**plan.to_json(), "weights": "fp8"})


def test_version_1_plans_still_load_as_float():
    plan = teal_fx.calibrate(tiny_model("llama"), DATA, sparsity=0.3, method="uniform", progress=False)
    data = plan.to_json()
    data["version"] = 1
    del data["weights"], data["lm_head"]
    old = Plan.from_json(data)
    assert old.weights is None and old.linears == plan.linears


def test_no_float_copy_of_a_quantized_weight_survives():
    """The float weights are freed as each matrix is quantized, even after Dynamo captured the model (calibration
    captures it first): a weak reference to an old weight dies."""
    import gc
    import weakref

    model = tiny_model("llama")
    old = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    teal_fx.find_linears(model)  # a captured graph that saw the float weights
    teal_fx.calibrate(model, DATA, sparsity=0.3, method="uniform", weights="int8", progress=False)
    gc.collect()
    assert old() is None
