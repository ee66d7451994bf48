"""``rewrite_matmul_as_linear``: a matmul with a transposed 2-D weight, or GPT-2's ``addmm(bias, x, W)``, becomes
F.linear with the same value, bit for bit (a bias added after a matmul stays an add); matmuls of anything else are left
alone."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from teal_fx.passes import rewrite_matmul_as_linear
from tests.conftest import compiled_through

TRANSPOSES = {
    "T": lambda w: w.T,
    "t()": lambda w: w.t(),
    "torch.t": lambda w: torch.t(w),
    "transpose(0, 1)": lambda w: w.transpose(0, 1),
    "transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    "permute(1, 0)": lambda w: w.permute(1, 0),
}


class Projection(torch.nn.Module):
    def __init__(self, n: int, k: int, spelling: str, bias: bool, bias_first: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k))
        self.bias = torch.nn.Parameter(torch.randn(n)) if bias else None
        self.spelling, self.bias_first = spelling, bias_first

    def forward(self, x):
        y = x @ TRANSPOSES[self.spelling](self.weight)
        if self.bias is not None:
            y = self.bias + y if self.bias_first else y + self.bias
        return y


def _linears(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]


@settings(max_examples=25, deadline=None)
@given(spelling=st.sampled_from(sorted(TRANSPOSES)), bias=st.booleans(), bias_first=st.booleans(),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 9), k=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_matmul_with_transposed_weight_becomes_linear(spelling, bias, bias_first, lead, n, k, dtype):
    torch.manual_seed(0)
    model = Projection(n, k, spelling, bias, bias_first).to(dtype)
    x = torch.randn(*lead, k, dtype=dtype)
    fn, graphs = compiled_through(rewrite_matmul_as_linear, model)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), atol=0, rtol=0)
    (gm,) = graphs
    (linear,) = _linears(gm)
    assert len(linear.args) == 2  # a bias stays an add: F.linear's would be added before rounding
    assert not any(n.op == "call_function" and n.target in (torch.matmul,) or "matmul" in str(n.target)
                   for n in gm.graph.nodes)
    assert linear.meta["example_value"].shape == model(x).shape


class NotProjections(torch.nn.Module):
    """Matmuls that are not a linear of a weight: activations times activations, an untransposed weight, a 3-D one."""

    def __init__(self) -> None:
        super().__init__()
        self.square = torch.nn.Parameter(torch.randn(3, 3))
        self.batched = torch.nn.Parameter(torch.randn(2, 4, 4))

    def forward(self, q, k):
        scores = q @ k.transpose(-1, -2)
        return scores @ self.square, q @ self.batched.transpose(-1, -2)


def test_other_matmuls_are_left_alone():
    model = NotProjections()
    q, k = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    fn, graphs = compiled_through(rewrite_matmul_as_linear, model)
    with torch.no_grad():
        for a, b in zip(fn(q, k), model(q, k)):
            torch.testing.assert_close(a, b)
    assert _linears(graphs[0]) == []


class StoredInByOut(torch.nn.Module):
    """GPT-2's Conv1D: the weight [in, out], ``addmm(bias, x2d, W)`` on the flattened tokens."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(k, n))
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.shape[:-1] + (-1,))


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n=st.integers(1, 9), k=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_addmm_with_a_weight_becomes_linear_of_its_transpose(lead, n, k, dtype):
    torch.manual_seed(0)
    model = StoredInByOut(k, n).to(dtype)
    x = torch.randn(*lead, k, dtype=dtype)
    fn, graphs = compiled_through(rewrite_matmul_as_linear, model)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), atol=0, rtol=0)
    (linear,) = _linears(graphs[0])
    x2d, wt, b = linear.args
    assert wt.target is torch.t and wt.args[0].op == "placeholder" and b.op == "placeholder"
    assert wt.meta["example_value"].shape == (n, k)
