"""The benches' switches of the quantized launch rule (``--tile-math``, ``--mlp-tile-math``): they set what the rule
reads, the rule then picks the switched loop, and a value the rule does not know is refused, not ignored."""
import argparse
import sys
from pathlib import Path

import pytest

from teal_fx.kernels import sparse_gemv_config as cfg

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from bench_common import add_rule_arguments, apply_rule_arguments  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_rule_arguments(ap)
    return ap.parse_args(list(argv))


@pytest.fixture
def restored(monkeypatch):
    """The module's switches as they were after the test (apply_rule_arguments assigns them)."""
    for name in ("INT8_TILE_MATH", "INT4_TILE_MATH", "MLP_TILE_MATH"):
        monkeypatch.setattr(cfg, name, getattr(cfg, name))


def test_defaults_change_nothing(restored):
    before = (cfg.INT8_TILE_MATH, cfg.INT4_TILE_MATH, cfg.MLP_TILE_MATH)
    assert apply_rule_arguments(parse()) == ""
    assert (cfg.INT8_TILE_MATH, cfg.INT4_TILE_MATH, cfg.MLP_TILE_MATH) == before


def test_switches_reach_the_rule(restored):
    said = apply_rule_arguments(parse("--tile-math", "2,4"))
    assert (cfg.INT8_TILE_MATH, cfg.INT4_TILE_MATH) == (2, 4) and "INT8_TILE_MATH=2" in said
    assert cfg.choose_config(1, 4096, 4096, 0.5, "int8").weight_math == 2  # the attention shapes: --tile-math
    assert cfg.choose_config(1, 4096, 4096, 0.5, "int4").weight_math == 4
    assert cfg.choose_config(1, 28672, 4096, 0.5, "int8").weight_math == cfg.MLP_TILE_MATH  # not the MLP shapes


def test_mlp_switch_reaches_the_mlp_shapes_only(restored):
    said = apply_rule_arguments(parse("--mlp-tile-math", "2"))
    assert "MLP_TILE_MATH=2" in said
    assert cfg.choose_config(1, 28672, 4096, 0.5, "int8").weight_math == 2
    assert cfg.choose_config(1, 28672, 4096, 0.5, "int4").weight_math == 2
    assert cfg.choose_config(1, 6144, 4096, 0.5, "int8").weight_math == cfg.INT8_TILE_MATH


@pytest.mark.parametrize("argv", [("--tile-math", "4"), ("--tile-math", "3,4"), ("--tile-math", "x,4"),
                                  ("--mlp-tile-math", "3"), ("--mlp-tile-math", "4,4")])
def test_unknown_values_are_refused(restored, argv):
    with pytest.raises(ValueError, match=argv[0]):
        apply_rule_arguments(parse(*argv))
