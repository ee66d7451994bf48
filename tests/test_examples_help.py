"""Every example script's ``--help`` prints: argparse formats help strings with %, so a bare "50%" in one breaks the
whole help text (bench_kernels.py's did, found by hand in session 31)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if "ArgumentParser(" in (t := p.read_text()) and "__main__" in t)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints(script, tmp_path):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
