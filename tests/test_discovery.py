"""Discovery labels the block linears of every supported architecture by structure, and nothing else."""
import pytest
import torch
import transformers as T

import teal_fx
from teal_fx.generate import cache_kwarg
from tests.conftest import ARCHS, EXPECTED_ROLES, tiny_model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_roles_per_block(arch, attn):
    if arch == "gemma2" and attn == "sdpa":
        pytest.skip("Gemma2 runs eager attention only")
    model = tiny_model(arch, layers=3, attn=attn)
    found = teal_fx.find_linears(model)
    by_block = {}
    for m in found:
        by_block.setdefault(m.block, []).append(m.role)
    assert sorted(by_block) == [0, 1, 2]
    for b, roles in by_block.items():
        assert sorted(roles) == sorted(EXPECTED_ROLES[arch]), (b, roles)
        # module names agree with structure (a cross-check, not the rule)
        assert all(f"layers.{b}." in m.key for m in found if m.block == b)
    keys = {m.key for m in found}
    assert not any("lm_head" in k or "embed" in k for k in keys)
    # roles agree with HF's module names
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj", "qkv": "qkv_proj", "gate_up": "gate_up_proj"}
    assert all(f".{names[m.role]}." in m.key for m in found)
    for m in found:
        w = model.get_parameter(m.key)
        assert tuple(w.shape) == m.shape


def test_decode_graph_with_static_cache():
    """The decode step (one token, KV cache written in place) is matched like the prefill graph."""
    model = tiny_model("llama")
    cache = T.StaticCache(config=model.config, max_cache_len=16)
    inputs = dict(input_ids=torch.tensor([[5]]), **{cache_kwarg(model): cache}, cache_position=torch.tensor([0]), use_cache=True)
    graphs, _ = teal_fx.capture_graphs(model, inputs)
    roles = [m.role for g in graphs for m in g.discovery.matched]
    assert sorted(roles) == sorted(EXPECTED_ROLES["llama"] * 2)


def test_summary_names_left_dense():
    graphs, _ = teal_fx.capture_graphs(tiny_model("qwen2"))
    s = graphs[0].discovery.summary()
    assert "matched 14 linears in 2 blocks" in s and "lm_head.weight (output projection" in s


class NoAttention(torch.nn.Module):
    """A 'language model' with linears but no attention: nothing may be matched."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"vocab_size": 32})()
        self.emb = torch.nn.Embedding(32, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def test_unsupported_model_runs_dense_with_clear_message():
    model = NoAttention().eval()
    graphs, _ = teal_fx.capture_graphs(model)
    d = graphs[0].discovery
    assert d.matched == []
    s = d.summary()
    assert "no decoder block recognised" in s and "runs dense" in s and "fc1.weight" in s
    ids = torch.randint(0, 32, (1, 4))
    compiled = torch.compile(model, backend="teal", options={"compiler": "eager"})
    with pytest.warns(UserWarning, match="no decoder block recognised"):
        out = compiled(ids)
    torch.testing.assert_close(out, model(ids))


@pytest.mark.parametrize("path", ["L['self'].model.layers.3.mlp.up_proj", "L['self']._modules['model']._modules['layers']"
                                  "._modules['3']._modules['mlp']._modules['up_proj']",
                                  "L['args'][0].model.layers.3.mlp.up_proj", "L['fn'].model.layers.3.mlp.up_proj"])
def test_keys_from_every_form_of_dynamo_source(path):
    """The root of a source is ``L['self']``, or ``L['args'][0]`` when the traced frame is a decorator's ``*args``
    wrapper of ``forward`` (transformers' ``deprecate_kwarg``): keys are the qualified names either way."""
    from teal_fx.passes.analysis.discovery import _clean_path, _placeholder_path

    assert _clean_path(path) == "model.layers.3.mlp.up_proj"
    for name in ("l_self_modules_model_modules_layers_modules_3_modules_mlp_modules_up_proj_parameters_weight_",
                 "l_args_0_modules_model_modules_layers_modules_3_modules_mlp_modules_up_proj_parameters_weight_"):
        assert _placeholder_path(name) == "model.layers.3.mlp.up_proj.weight"
