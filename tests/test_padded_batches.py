"""Left-padded batches (prompts of different lengths) through ``teal_fx.generate(attention_mask=...)`` and Hugging
Face ``generate()`` with the teal backend, with per-row and shared masks: padding never changes what a row decodes
beyond what the batch's shared statistic (real tokens only) makes it."""
import pytest
import torch
from transformers import CompileConfig

import teal_fx
from tests.conftest import masked_inputs, tiny_model

PAD = 0


def left_pad(prompts: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def generated(out: torch.Tensor, width: int) -> torch.Tensor:
    return out[:, width:]


@pytest.fixture(scope="module")
def model_and_plans():
    model = tiny_model("llama")
    data = torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(1))
    plan = teal_fx.calibrate(model, data, sparsity=0.5, method="uniform", batch_mask="shared", progress=False,
                             attach=False)
    from dataclasses import replace
    return model, {"per_row": replace(plan, batch_mask="per_row"), "shared": plan}


PROMPTS = [[5, 17, 33, 9, 41, 7], [22, 8, 61], [90, 14, 3, 77]]


def test_a_padded_row_decodes_as_it_would_alone_dense(model_and_plans):
    model, _ = model_and_plans
    teal_fx.detach_plan(model)
    ids, mask = left_pad(PROMPTS, 6)
    out = generated(teal_fx.generate(model, ids, 8, backend="none", eos_token_id=-1, attention_mask=mask), 6)
    for i, p in enumerate(PROMPTS):
        alone = generated(teal_fx.generate(model, torch.tensor([p]), 8, backend="none", eos_token_id=-1), len(p))
        assert torch.equal(out[i], alone[0]), i


@pytest.mark.parametrize("mask_kind", ["per_row", "shared"])
def test_more_padding_changes_nothing_and_matches_the_masked_reference(model_and_plans, mask_kind):
    """The same prompts padded to 6 and to 11 positions decode the same tokens through the teal backend (padding is
    masked out of attention and out of the shared statistic), and equal the eager model with masked inputs."""
    model, plans = model_and_plans
    plan = plans[mask_kind]
    teal_fx.attach_plan(model, plan)
    outs = []
    for width in (6, 11):
        ids, mask = left_pad(PROMPTS, width)
        outs.append(generated(teal_fx.generate(model, ids, 8, eos_token_id=-1, attention_mask=mask,
                                               options={"compiler": "eager"}), width))
        with masked_inputs(model, plan, sparse_from=1.0):
            ref = teal_fx.generate(model, ids, 8, backend="none", eos_token_id=-1, attention_mask=mask)
        assert torch.equal(outs[-1], generated(ref, width))
    assert torch.equal(outs[0], outs[1])
    teal_fx.detach_plan(model)


@pytest.mark.parametrize("mask_kind, dynamic", [("per_row", False), ("shared", False), ("shared", None)])
def test_hf_generate_with_left_padding_through_the_backend(model_and_plans, mask_kind, dynamic):
    """Hugging Face generate() (static cache, decode step compiled through backend="teal", compiled on the CPU too)
    on a left-padded batch with its attention mask gives teal_fx.generate's tokens. HF runs first, so it does not
    merely reuse what teal_fx.generate compiled for the same frame and shapes (Dynamo's cache is per code object).
    Its default CompileConfig (dynamic=None) recompiles into a dynamic batch, where a shared mask takes the batch's
    threshold at run time (``reference.sparsify_shared_by_batch``); dynamic=False compiles it in."""
    model, plans = model_and_plans
    teal_fx.attach_plan(model, plans[mask_kind])
    ids, mask = left_pad(PROMPTS, 7)
    cfg = CompileConfig(backend="teal", fullgraph=False, dynamic=dynamic)
    cfg._compile_all_devices = True  # transformers compiles only on accelerators unless told
    counters = torch._dynamo.utils.counters["teal"]
    before, runtime_before = counters["sparse_graph_calls"], counters["runtime_batch_thresholds"]
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=PAD, cache_implementation="static", compile_config=cfg)
    assert counters["sparse_graph_calls"] > before  # the decode steps ran sparse
    # a dynamic batch's shared masks chose their thresholds at run time
    assert (counters["runtime_batch_thresholds"] > runtime_before) == (mask_kind == "shared" and dynamic is None)
    ours = teal_fx.generate(model, ids, 8, eos_token_id=-1, attention_mask=mask)
    assert torch.equal(hf, ours)
    teal_fx.detach_plan(model)


def test_bad_masks_are_refused(model_and_plans):
    model, plans = model_and_plans
    ids, mask = left_pad(PROMPTS, 6)
    with pytest.raises(ValueError, match="left padding"):
        teal_fx.generate(model, ids, 2, backend="none", attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="shape"):
        teal_fx.generate(model, ids, 2, backend="none", attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="0 .padding. and 1"):
        teal_fx.generate(model, ids, 2, backend="none", attention_mask=mask * 2)
    from dataclasses import replace
    teal_fx.attach_plan(model, replace(plans["shared"], prefill_sparse_from=0.5))
    with pytest.raises(ValueError, match="padding positions"):
        teal_fx.generate(model, ids, 2, attention_mask=mask)
    teal_fx.detach_plan(model)
