"""Shared masks end to end on the CPU: calibration records the batch means' histograms, the plan keeps a threshold
per batch size (saved, re-derived by ``at``), the rewrite picks the graph's batch size, the compiled batch equals the
masked reference, and the realised sparsity of a batch of B windows from different places is near the plan's."""
import pytest
import torch

import teal_fx
from teal_fx.errors import PlanError
from teal_fx.kernels.reference import keep_mask
from teal_fx.plan import Plan
from tests.conftest import tiny_model

DATA = torch.randint(0, 100, (24, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def shared():
    model = tiny_model("llama")
    plan = teal_fx.calibrate(model, DATA, sparsity=0.5, method="uniform", batch_mask="shared", progress=False,
                             attach=False)
    return model, plan


def test_plan_has_a_threshold_per_batch_size_that_survives_save_and_at(shared, tmp_path):
    _, plan = shared
    assert plan.batch_mask == "shared"
    lp = next(iter(plan.linears.values()))
    sizes = [b for b, _ in lp.batch_thresholds]
    assert sizes == [2, 4, 8, 16]
    ts = dict(lp.batch_thresholds)
    assert lp.threshold_for(1) == lp.threshold and lp.threshold_for(8) == ts[8] and lp.threshold_for(6) == ts[8]
    # the mean of more rows is narrower: its 50% quantile moves away from the one-row quantile of a Laplace-like |x|
    assert ts[2] != lp.threshold
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.batch_mask == "shared" and again.linears == plan.linears
    assert again.at(0.3).linears[lp.key].batch_thresholds[0][1] < ts[2]  # less sparsity, lower threshold
    with pytest.raises(PlanError, match="batch_mask"):
        Plan.from_json({**plan.to_json(), "batch_mask": "union"})


def test_compiled_batch_equals_the_shared_mask_reference(shared):
    model, plan = shared
    teal_fx.attach_plan(model, plan)
    ids = torch.randint(3, 100, (4, 1))  # a decode-shaped batch of 4 sequences
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
    handles = []
    for name, mod in model.named_modules():  # the reference: each linear's input masked by the batch's mean |x|
        key = name + ".weight"
        if key in plan:
            t = plan.linears[key].threshold_for(4)
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, t=t: (torch.where(keep_mask(a[0], t, shared=True), a[0], 0.0),)))
    try:
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    teal_fx.detach_plan(model)


@pytest.mark.parametrize("batch", [2, 4, 8])
def test_realised_shared_sparsity_is_near_the_plan(shared, batch):
    model, plan = shared
    got = teal_fx.realised_sparsity(model, plan, DATA, num_sequences=16, seq_len=64, batch=batch)
    err = [abs(v - plan.linears[k].sparsity) for k, v in got.items()]
    assert sum(err) / len(err) < 0.05  # a tiny random model on 16 windows: the CPU check; the real one is SmolLM2's


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="shared thresholds are read from a dense run; in a sparse run each mask shrinks later inputs "
                   "and the narrow batch mean drops more than planned (docs/perf-log.md v30)")
def test_realised_shared_sparsity_holds_in_a_sparse_run(shared):
    model, plan = shared
    got = teal_fx.realised_sparsity(model, plan, DATA, num_sequences=16, seq_len=64, batch=8, sparse_run=True)
    err = [abs(v - plan.linears[k].sparsity) for k, v in got.items()]
    assert sum(err) / len(err) < 0.05


def test_spread_batches_change_only_what_rows_share(shared):
    """Perplexity sums over windows: the order of windows in batches leaves per-row masks' perplexity unchanged, and
    a shared mask sees other batches (so its perplexity changes)."""
    from dataclasses import replace

    from teal_fx.evaluate import evaluate_perplexity

    model, plan = shared
    ids = DATA.reshape(-1)[:1024]
    kw = dict(window=64, batch_size=4, progress=False)
    per_row = replace(plan, batch_mask="per_row")
    a = evaluate_perplexity(model, ids, per_row, **kw).perplexity
    assert a == pytest.approx(evaluate_perplexity(model, ids, per_row, spread=True, **kw).perplexity, rel=1e-6)
    s1 = evaluate_perplexity(model, ids, plan, **kw).perplexity
    s2 = evaluate_perplexity(model, ids, plan, spread=True, **kw).perplexity
    assert s1 != pytest.approx(s2, rel=1e-9)


def test_batch_means_average_rows_of_different_windows():
    """A batch's rows come from different sequences: the calibrated mean of B rows averages B windows, not B rows of
    one window (rows of one text are alike). Windows alternating all-0.2 and all-1.0 rows: every mean of 2 or 4 rows
    from consecutive windows is 0.6; averaging within a window would give 0.2 or 1.0."""
    from teal_fx.calibrate import Recorder

    rec = Recorder(greedy=False, batch_sizes=(2, 4), windows=8)
    for i in range(8):
        rec.add_batch_means(["k"], torch.full((1, 32, 16), 0.2 if i % 2 == 0 else 1.0))
    for b in (2, 4):
        h = rec.batch_histograms["k"][b]
        assert h.total > 0
        assert h.quantile(0.01) == pytest.approx(0.6, rel=0.05) and h.quantile(0.99) == pytest.approx(0.6, rel=0.05)


def test_realised_sparsity_with_fewer_windows_than_the_batch_is_an_error(shared):
    model, plan = shared
    with pytest.raises(ValueError, match="cannot fill one batch of 16"):
        teal_fx.realised_sparsity(model, plan, DATA, num_sequences=8, seq_len=64, batch=16)
