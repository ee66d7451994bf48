"""The teal-fx command line, on SmolLM2 with tiny settings."""
import json

import pytest

from teal_fx.cli import main
from tests.conftest import SHARED

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
