"""bench_decode.py's shared-mask rows time a random-weight model at thresholds read from its own decode steps
(``with_decode_thresholds``): the check that those keep the plan's sparsity while decoding, on the CPU; and the rows
its ``--ab-option`` times."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

import teal_fx
from tests.conftest import tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import bench_decode as bd  # noqa: E402

DATA = torch.randint(0, 128, (24, 64), generator=torch.Generator().manual_seed(0))


def test_thresholds_read_from_decode_steps_hold_the_plans_sparsity_while_decoding():
    model = tiny_model("llama")
    plan = teal_fx.calibrate(model, DATA, sparsity=0.5, method="uniform", batch_mask="shared", progress=False,
                             attach=False)
    torch.manual_seed(1)
    fixed = bd.with_decode_thresholds(model, plan, 8, prompt=16, steps=24)
    for k, lp in plan.linears.items():  # only the entry for 8 rows is re-read
        old, new = dict(lp.batch_thresholds), dict(fixed.linears[k].batch_thresholds)
        assert {b: v for b, v in old.items() if b != 8} == {b: v for b, v in new.items() if b != 8}
    torch.manual_seed(2)  # other prompts than those the thresholds were read from
    got, lo, hi = bd.realised_decode_sparsity(model, fixed, 8, prompt=16, steps=24)
    assert abs(got - 0.5) < 0.02, (got, lo, hi)
    assert 0.3 < lo <= hi < 0.7


def test_ab_option_rows():
    """--ab-option's rows: one option off then on; several all off, each alone, then all on; unknown names refused."""
    rows = lambda text: bd._ab_variants(argparse.Namespace(ab_option=bd._ab_option_list(text) if text else None))  # noqa: E731
    assert rows("") == [None]
    assert rows("fold_swiglu") == [{"fold_swiglu": False}, {"fold_swiglu": True}]
    assert rows("fold_swiglu,fold_qkv_attention") == [
        {"fold_swiglu": False, "fold_qkv_attention": False}, {"fold_swiglu": True, "fold_qkv_attention": False},
        {"fold_swiglu": False, "fold_qkv_attention": True}, {"fold_swiglu": True, "fold_qkv_attention": True}]
    assert bd._ab_label({"fold_swiglu": True}) == ", fold_swiglu=True"
    with pytest.raises(argparse.ArgumentTypeError, match="on/off options"):
        bd._ab_option_list("fold_swiglu,plan")
