"""fold_qkv_finish_into_attention: a decode graph's ``teal::sparse_linear_qkv_rope`` read only by the
``teal::decode_attention`` over the caches it writes becomes one teal::sparse_qkv_rope_attention, and the step computes
what it computed (on the CPU the op runs the two ops it replaced: the same logits and caches, bit for bit). The
kernel's own test is in tests/test_qkv_rope_kernel.py."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import teal_fx
from tests.conftest import count_calls, decode_graph_after_passes, tiny_model
from tests.test_fold_rope import _decode_step, assert_fold_keeps_the_step

FOLDED = torch.ops.teal.sparse_qkv_rope_attention.default
QKV = torch.ops.teal.sparse_linear_qkv_rope.default


def test_needs_the_rope_fold():
    """On a graph without a static cache (no cache writes) nothing folds; the step test below folds every block."""
    model = tiny_model("llama", layers=2)
    assert count_calls(decode_graph_after_passes(model, torch.tensor([[4]]), fold_qkv_attention=True), FOLDED) == 0


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "mistral"]), batch=st.integers(1, 3),
       prompt=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_folded_step_computes_what_the_graph_computed(arch, batch, prompt, dtype, seed):
    assert_fold_keeps_the_step("fold_qkv_attention", "qkv_finish_folded", arch, batch, prompt, dtype, seed)


def test_switched_off_the_step_keeps_its_ops():
    model = tiny_model("llama", layers=2)
    counters.clear()
    _decode_step(model, teal_fx.Plan.from_thresholds(teal_fx.find_linears(model), 0.3), torch.tensor([[5]]),
                 torch.tensor([[4, 6]]), fold_qkv_attention=False)
    assert counters["teal"]["qkv_finish_folded"] == 0 and counters["teal"]["rope_folded"] == 2


def attention_op_args() -> tuple:
    """Arguments of ``teal::sparse_qkv_rope_attention`` on the CPU: 2 rows of 32 inputs, 4 query heads of 16 on 2 KV
    heads, 8-position caches (the new one at 3)."""
    x = torch.randn(2, 1, 32)
    ws = [torch.randn(n, 32) for n in (64, 32, 32)]
    cos, sin = torch.randn(2, 1, 1, 16), torch.randn(1, 1, 1, 16)
    caches = [torch.zeros(2, 2, 8, 16) for _ in range(2)]
    mask = torch.arange(8).view(1, 1, 1, 8) <= 3
    return (x, ws, [None] * 3, [0.1, 0.1, 0.0], 1.0, [0.3] * 3, [None] * 3, False, False, 16, cos, sin,
            torch.tensor([3]), *caches, None, None, 1e-6, mask, 0.25)


def test_opcheck():
    """The schema's mutations (the two caches, nothing else), the fake's shape, and the CPU path."""
    args = attention_op_args()
    torch.library.opcheck(FOLDED, args, test_utils=("test_schema", "test_faketensor"))
    out = FOLDED(*args)
    assert out.shape == (2, 4, 1, 16)
