"""replace_outer_product_matmul: a matmul over a dimension of 1 becomes a multiply with the same value (drawn shapes,
batch broadcasting, each way of writing it); anything else, and any matmul in an enabled autocast region, stays."""
import operator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teal_fx.passes import replace_outer_product_matmul
from tests.conftest import compiled_through


def _rewritten(fn, *args):
    compiled, graphs = compiled_through(replace_outer_product_matmul, fn, dynamic=False)
    return compiled(*args), graphs[0]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm"}
WAYS = {
    "@": lambda a, b: a @ b,
    "torch.matmul": torch.matmul,
    "method": lambda a, b: a.matmul(b),
    "bmm": torch.bmm,
    "mm": torch.mm,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(way=st.sampled_from(sorted(WAYS)), m=st.integers(1, 9), n=st.integers(1, 9), batch=st.integers(1, 3),
       broadcast=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_outer_products_become_multiplies_with_the_same_value(way, m, n, batch, broadcast, dtype):
    if way == "mm":
        a, b = torch.randn(m, 1), torch.randn(1, n)
    elif way == "bmm":
        a, b = torch.randn(batch, m, 1), torch.randn(batch, 1, n)
    else:  # matmul broadcasts the batch dimensions: [B, M, 1] @ [1, N] or [B, M, 1] @ [B, 1, N]
        a, b = torch.randn(batch, m, 1), (torch.randn(1, n) if broadcast else torch.randn(batch, 1, n))
    a, b = a.to(dtype), b.to(dtype)
    fn = WAYS[way]
    got, gm = _rewritten(lambda x, y: fn(x, y).transpose(-1, -2).cos(), a, b)
    assert not MATMULS & set(_targets(gm)) and operator.mul in _targets(gm)
    mul = next(n for n in gm.graph.nodes if n.target is operator.mul)
    assert mul.meta["example_value"].shape == fn(a, b).shape  # the fake value kept
    assert torch.equal(got, fn(a, b).transpose(-1, -2).cos())  # one product an element: bit-equal


def test_the_rotary_angles_of_older_transformers_become_a_multiply():
    # LlamaRotaryEmbedding up to transformers 5.17: inv_freq [B, D/2, 1] @ positions [B, 1, L], fp32, autocast off
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    pos = torch.tensor([[37]])

    def angles(inv, p):
        inv_e = inv[None, :, None].float().expand(p.shape[0], -1, 1)
        with torch.autocast(device_type="cpu", enabled=False):
            freqs = (inv_e.float() @ p[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()

    got, gm = _rewritten(angles, inv_freq, pos)
    assert operator.matmul not in _targets(gm) and operator.mul in _targets(gm)
    want = angles(inv_freq, pos)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("case", ["k=2", "k=2 square", "vector", "autocast"])
def test_anything_else_stays_a_matmul(case):
    a, b = torch.randn(3, 4, 1), torch.randn(3, 1, 5)
    if case == "k=2":
        fn, args = (lambda x, y: x @ y), (torch.randn(3, 4, 2), torch.randn(3, 2, 5))
    elif case == "k=2 square":  # the operands broadcast to the result's shape, yet it is a sum of two products
        fn, args = (lambda x, y: x @ y), (torch.randn(3, 2, 2), torch.randn(3, 2, 2))
    elif case == "vector":  # a 1-d operand: matmul's vector rules, not a multiply's broadcast
        fn, args = (lambda x, y: x @ y), (torch.randn(4, 1), torch.randn(1))
    else:  # in an enabled autocast region the matmul runs in bf16 and a multiply would not

        def fn(x, y):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                return x @ y
        args = (a, b)
    got, gm = _rewritten(fn, *args)
    assert MATMULS & set(_targets(gm)) and operator.mul not in _targets(gm)
    assert torch.equal(got, fn(*args))
