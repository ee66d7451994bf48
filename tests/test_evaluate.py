"""evaluate_perplexity: the same plan evaluated twice is served from Dynamo's cache and still counts as sparse; a
model that did not run through the teal backend is refused, never reported as sparse."""
import pytest
import torch

import teal_fx
from teal_fx.evaluate import evaluate_perplexity
from tests.conftest import tiny_model

IDS = torch.randint(0, 100, (512,), generator=torch.Generator().manual_seed(1))


def test_same_plan_twice_and_eager_fallback_refused(monkeypatch):
    model = tiny_model("llama")
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.4)
    kw = dict(window=64, batch_size=4, progress=False)
    dense = evaluate_perplexity(model, IDS, None, **kw).perplexity
    first = evaluate_perplexity(model, IDS, plan, **kw).perplexity
    assert first != pytest.approx(dense, rel=1e-6)
    assert evaluate_perplexity(model, IDS, plan, **kw).perplexity == pytest.approx(first, rel=1e-6)
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)  # as if Dynamo ran it eagerly
    with pytest.raises(RuntimeError, match="not compiled through the teal backend"):
        evaluate_perplexity(model, IDS, plan, **kw)
