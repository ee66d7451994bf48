"""The teal-fx command line, on SmolLM2 with tiny settings."""
import argparse
import json

import pytest
import torch

import teal_fx
from teal_fx.cli import build_parser, main
from tests.conftest import SHARED, tiny_model

VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    pytest.importorskip("gguf")
    if not VALID.is_file():
        pytest.skip("no ../shared/data/wikitext-2")
    p = tmp_path_factory.mktemp("cli") / "small.txt"
    p.write_text(VALID.read_text()[:20_000])
    return p


def test_calibrate_eval_inspect_plot(small_text, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--data", str(small_text), "--sparsity", "0.4", "--num-sequences", "2", "--seq-len",
                 "64", "--step", "0.2", "--max-sparsity", "0.5", "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["format"] == "teal-fx-plan"
    assert main(["eval", "--plan", str(plan), "--text", str(small_text), "--window", "128", "--max-tokens", "400",
                 "--protocol", "both"]) == 0
    out = capsys.readouterr().out
    assert "protocol=all" in out and "protocol=teal" in out and "perplexity" in out
    assert main(["inspect", "--plan", str(plan)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.29.mlp.down_proj.weight" in table and "0.4" in table
    pytest.importorskip("matplotlib")
    png = tmp_path / "alloc.png"
    assert main(["plot", "--plan", str(plan), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plot", "--plan", str(bad)]) == 2
    assert "not a teal-fx plan" in capsys.readouterr().err
    assert main(["inspect", "--model", str(tmp_path / "nope.gguf")]) == 2


def test_user_errors_exit_2_with_one_line_and_before_any_long_work(tmp_path, capsys):
    """Issue 24, item 10: no traceback for an unwritable --out, a folder as --plan, --device cuda without CUDA; the
    output path is checked before the model is loaded or calibrated (these all return at once)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["calibrate", "--model", str(tmp_path / "never_loaded.gguf"), "--out", str(blocker / "plan.json")]) == 2
    assert main(["calibrate", "--out", str(tmp_path)]) == 2
    assert "a folder" in capsys.readouterr().err
    for cmd in (["inspect", "--plan", str(tmp_path)], ["eval", "--plan", str(tmp_path), "--text", "t.txt"],
                ["plot", "--plan", str(tmp_path)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "a folder" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["inspect", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_every_option_says_what_it_does_and_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, (name, action.dest)
        assert "(default:" in sub.format_help(), name


def test_inspect_with_another_models_plan_says_so(small_text, tmp_path, capsys):
    """Issue 24, item 6: it printed a table of dashes and exited 0."""
    plan = teal_fx.Plan.from_thresholds(teal_fx.find_linears(tiny_model("llama")), 0.2, model="tiny llama")
    path = plan.save(tmp_path / "other.json")
    assert main(["inspect", "--plan", str(path)]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_calibrate_takes_the_batch_mask(capsys):
    assert build_parser().parse_args(["calibrate"]).batch_mask == "per_row"
    assert build_parser().parse_args(["calibrate", "--batch-mask", "shared"]).batch_mask == "shared"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--batch-mask", "union"])
    assert "invalid choice: 'union'" in capsys.readouterr().err


def test_calibrate_takes_the_weight_format_and_int8_activations(capsys):
    args = build_parser().parse_args(["calibrate"])
    assert (args.weights, args.quantize_lm_head, args.activations) == (None, None, None)
    args = build_parser().parse_args(["calibrate", "--weights", "int4", "--quantize-lm-head", "--activations", "int8"])
    assert (args.weights, args.quantize_lm_head, args.activations) == ("int4", "int8", "int8")
    args = build_parser().parse_args(["calibrate", "--weights", "int4", "--quantize-lm-head", "int4"])
    assert args.quantize_lm_head == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--quantize-lm-head", "int2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--activations", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
