"""Calibration: quantiles, the greedy allocator, plan re-derivation, bad data."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import teal_fx
from teal_fx.allocate import block_sparsity, greedy_path, row_at
from teal_fx.errors import CalibrationDataError
from teal_fx.histogram import AbsHistogram
from teal_fx.plan import Plan, PlanError
from tests.conftest import tiny_model


@settings(max_examples=40, deadline=None)
@given(n=st.integers(200, 5000), scale=st.floats(1e-3, 1e3), laplace=st.booleans(), p=st.floats(0.05, 0.95),
       seed=st.integers(0, 10_000))
def test_quantile_matches_exact_sorting(n, scale, laplace, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if laplace:
        x = torch.distributions.Laplace(0.0, scale).sample((n,))
    h = AbsHistogram()
    for chunk in x.split(97):
        h.add(chunk)
    t = h.quantile(p)
    exact = torch.sort(x.abs()).values
    # the fraction actually at or below t is within one bin's worth of p (bins are 1.1% wide in value)
    frac = float((x.abs() <= t).float().mean())
    lo = float((x.abs() <= t / 1.011).float().mean())
    hi = float((x.abs() <= t * 1.011).float().mean())
    assert lo - 1.5 / n <= p <= hi + 1.5 / n, (p, frac)
    assert abs(h.fraction_at_or_below(t) - p) < 1e-6 + 1.0 / n
    assert exact[0] <= t <= exact[-1] * 1.02


def test_histogram_round_trip_and_errors():
    h = AbsHistogram()
    h.add(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]))
    assert h.quantile(0.4) == 0.0  # exact zeros sit in the underflow bin
    back = AbsHistogram.from_json(h.to_json())
    assert back.quantile(0.8) == h.quantile(0.8)
    with pytest.raises(CalibrationDataError, match="NaN"):
        h.add(torch.tensor([1.0, float("nan")]), name="q_proj")
    with pytest.raises(CalibrationDataError, match="empty"):
        AbsHistogram().quantile(0.5)


def test_greedy_allocator_takes_the_cheapest_linear_first():
    """Toy block: error = sum_k c_k * s_k^2 with known costs; equal sizes, so the order is by cost."""
    cost = {"cheap": 0.1, "mid": 1.0, "dear": 10.0}
    numel = {k: 100 for k in cost}
    path = greedy_path(lambda row: sum(cost[k] * row[k] ** 2 for k in row), numel, step=0.05, max_sparsity=0.5)
    assert path[0] == {k: 0.0 for k in cost}
    first_moves = [next(k for k in cost if b[k] > a[k]) for a, b in zip(path, path[1:])][:3]
    assert first_moves[0] == "cheap"
    final = path[-1]
    assert final["cheap"] > final["mid"] > final["dear"]
    assert math.isclose(block_sparsity(final, numel), 0.5, abs_tol=0.06)
    # steps are inversely proportional to size: a 4x larger linear moves 4x less per step
    path2 = greedy_path(lambda row: 0.0, {"big": 400, "small": 100}, step=0.04, max_sparsity=0.1)
    incs = {k: max(r[k] for r in path2[:3]) for k in ("big", "small")}
    assert any(v > 0 for v in incs.values())
    # an evaluator that runs candidates from the current row (teal_fx/block_error.py) is told each row moved to
    moved = []
    path3 = greedy_path(lambda row: sum(cost[k] * row[k] ** 2 for k in row), numel, step=0.05, max_sparsity=0.5,
                        accept=moved.append)
    assert path3 == path and moved == path[1:]


def test_a_small_linear_moves_in_capped_steps_compared_per_weight_removed():
    """Issue 24, item 11: with TEAL's proportional step a linear 1/100 of the block's size jumped from dense to the
    cap in one step; now no linear moves by more than max_step (4 x step) at once, so the path visits the points
    between, and a cheap small linear is still taken first (its error per weight removed is lowest)."""
    numel = {"big": 1000, "tiny": 10}
    cost = {"big": 1.0, "tiny": 0.01}
    path = greedy_path(lambda row: sum(cost[k] * numel[k] * row[k] ** 2 for k in row), numel, step=0.05,
                       max_sparsity=0.6)
    steps = [b["tiny"] - a["tiny"] for a, b in zip(path, path[1:])]
    assert max(steps) <= 0.2 + 1e-9 and path[1]["tiny"] > 0  # capped, and taken first
    assert len({round(r["tiny"], 6) for r in path}) > 3  # the points between were visited
    assert math.isclose(block_sparsity(path[-1], numel), 0.6, abs_tol=0.06)


def test_row_at_interpolates_and_refuses_beyond_the_path():
    numel = {"a": 1, "b": 1}
    path = [{"a": 0.0, "b": 0.0}, {"a": 0.4, "b": 0.0}, {"a": 0.4, "b": 0.4}]
    assert row_at(path, numel, 0.1) == pytest.approx({"a": 0.2, "b": 0.0})
    assert row_at(path, numel, 0.3) == pytest.approx({"a": 0.4, "b": 0.2})
    with pytest.raises(PlanError, match="re-calibrate"):
        row_at(path, numel, 0.5)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama", layers=2)
    data = torch.randint(3, 128, (6, 48))
    plan = teal_fx.calibrate(model, data, sparsity=0.5, num_sequences=6, seq_len=48, step=0.05,
                             max_sparsity=0.7, progress=False)
    return model, plan


def test_calibrated_plan_hits_its_targets(calibrated):
    model, plan = calibrated
    assert plan.method in ("greedy", "uniform") and math.isclose(plan.model_sparsity(), 0.5, abs_tol=1e-6)
    held_out = torch.randint(3, 128, (4, 48))
    real = teal_fx.realised_sparsity(model, plan, held_out, num_sequences=4, seq_len=48)
    assert set(real) == set(plan.linears)
    for k, v in real.items():
        assert abs(v - plan.linears[k].sparsity) < 0.05, k  # random tiny model, 200 tokens: loose


def test_greedy_is_kept_only_where_it_predicts_held_back_text_at_least_as_well(calibrated):
    """Issue 24, item 11: greedy must never be worse than uniform on the calibration data. The plan says which it
    kept, with both NLLs on windows the histograms and the search never saw."""
    model, plan = calibrated
    note = plan.notes["allocation"]
    nll = note["nll"]
    assert note["kept"] == plan.method == min(nll, key=nll.get) and note["held_out_sequences"] == 1
    assert plan.notes["calibration"]["sequences"] == 5  # 6 windows given, one set aside
    assert plan.at(0.4).method == plan.method  # re-derived with the allocation that was kept


def test_a_worse_greedy_plan_gives_way_to_uniform(calibrated, monkeypatch):
    import teal_fx.choose_allocation as choose

    model, plan = calibrated
    held = torch.randint(3, 128, (2, 32))
    monkeypatch.setattr(choose, "held_out_nll", lambda m, p, seqs: {"greedy": 3.2, "uniform": 3.1}[p.method])
    chosen = choose.choose_allocation(model, plan, 0.5, held)
    assert chosen.method == "uniform" and chosen.notes["allocation"]["kept"] == "uniform"
    assert chosen.linears == plan.at(0.5, "uniform").linears
    monkeypatch.setattr(choose, "held_out_nll", lambda m, p, seqs: {"greedy": 3.0, "uniform": 3.1}[p.method])
    assert choose.choose_allocation(model, plan, 0.5, held).method == "greedy"


def test_plan_at_is_instant_and_round_trips(calibrated, tmp_path):
    model, plan = calibrated
    back = Plan.load(plan.save(tmp_path / "p.json"))
    for s in (0.25, 0.4, 0.65):
        a, b = plan.at(s), back.at(s)
        assert math.isclose(a.model_sparsity(), s, abs_tol=1e-6)
        assert {k: v.threshold for k, v in a.linears.items()} == pytest.approx({k: v.threshold for k, v in b.linears.items()})
    u = plan.at(0.4, "uniform")
    assert all(math.isclose(lp.sparsity, 0.4) for lp in u.linears.values())
    with pytest.raises(PlanError, match="re-calibrate"):
        plan.at(0.9)
    assert teal_fx.find_linears(model) and teal_fx.attached_plan(model) is plan


def test_bad_calibration_data():
    model = tiny_model("llama")
    with pytest.raises(CalibrationDataError, match="too short"):
        teal_fx.calibrate(model, torch.randint(3, 128, (5,)), progress=False)
    with pytest.raises(CalibrationDataError, match="empty"):
        teal_fx.calibrate(model, "   \n  ", tokenizer=object(), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        teal_fx.calibrate(model, "some text that needs a tokenizer\nsecond line", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        teal_fx.calibrate(model, None, progress=False)
    no_ids = type("NoSpecialIds", (), {"pad_token_id": None, "eos_token_id": None,
                                       "__call__": lambda self, text: type("Enc", (), {"input_ids": [5, 6]})()})()
    with pytest.raises(ValueError, match="pad_token_id or an eos_token_id"):
        teal_fx.calibrate(model, None, tokenizer=no_ids, progress=False)
    with pytest.raises(TypeError):
        teal_fx.calibrate(model, torch.randn(4, 32), progress=False)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.fill_(float("nan"))
    with pytest.raises(CalibrationDataError, match="NaN"):
        teal_fx.calibrate(model, torch.randint(3, 128, (2, 32)), num_sequences=2, seq_len=32, progress=False)


def test_a_path_that_is_not_there_is_an_error_not_the_text(tmp_path):
    """``calibrate(model, "typo.txt")`` used to calibrate on the eight characters of the path (issue 24, item 3)."""
    from teal_fx.calibrate import read_text

    model = tiny_model("llama")
    for typo in ("typo.txt", str(tmp_path / "missing.json"), "data/wiki/valid"):
        with pytest.raises(FileNotFoundError, match="pathlib.Path"):
            teal_fx.calibrate(model, typo, tokenizer=object(), progress=False)
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing")
    real = tmp_path / "real.txt"
    real.write_text("some text")
    assert read_text(str(real)) == read_text(real) == "some text"
    assert read_text("a sentence, and/or another one.") == "a sentence, and/or another one."
    assert read_text("one line of plain text") == "one line of plain text"


@settings(max_examples=30, deadline=None)
@given(total=st.integers(16, 3000), n=st.integers(1, 40), L=st.integers(16, 300))
def test_token_windows_spread_over_the_whole_text(total, n, L):
    from teal_fx.calibrate import token_sequences

    ids = torch.arange(total)
    seqs = token_sequences(ids, None, num_sequences=n, seq_len=L)
    L = min(L, total)
    assert seqs.shape == (min(n, total // L), L)
    starts = seqs[:, 0].tolist()
    assert all(torch.equal(row, torch.arange(s, s + L)) for row, s in zip(seqs, starts))  # contiguous windows
    assert starts[0] == 0 and all(b - a >= L for a, b in zip(starts, starts[1:]))  # in order, no overlap
    if len(starts) > 1:
        assert starts[-1] + L == total  # the last window reaches the end of the text
