"""The perplexity CLI on the real SmolLM2 checkpoint reproduces the published float32 baseline."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"


def test_cli_reproduces_smollm2_wikitext_baseline(smollm2_dir):
    """../shared/data/README.md: float32, ctx 512, first 8 windows of wiki.test.raw give 30.356."""
    result = subprocess.run([sys.executable, "-m", "quantize.evaluate", "--model", str(smollm2_dir), "--data",
                             str(WIKI), "--ctx", "512", "--windows", "8", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"perplexity: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) == pytest.approx(30.356, abs=0.01)
