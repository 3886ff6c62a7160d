"""`python -m qwen_model.profile` end to end on the tiny model and its Int4 checkpoint (real subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_profile(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "qwen_model.profile", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_int4(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "int4"
    subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--method", "rtn",
                    "--out", str(out), "-q"], cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


def test_profile_table_float_and_int4_weights_by_cache(tiny_dir, tiny_int4, tmp_path):
    out_json = tmp_path / "rows.json"
    r = run_profile("--model", tiny_dir, tiny_int4, "--kv", "float", "int8", "int4", "--context", 48,
                    "--generate", 5, "--batch", 3, "--threads", 1, "--device", "cpu", "--json", out_json)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out_json.read_text())
    assert [(Path(x["model"]).name, x["weights"], x["kv"]) for x in rows] == [
        (tiny_dir.name, "float32", "float"), (tiny_dir.name, "float32", "int8"), (tiny_dir.name, "float32", "int4"),
        ("int4", "int4 g128", "float"), ("int4", "int4 g128", "int8"), ("int4", "int4 g128", "int4")]
    for row in rows:
        assert row["generate"] == 5 and row["batch"] == 3 and row["context"] == 48 and row["threads"] == 1
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "average_tokens_per_s"):
            assert 0 < row[key] < 1e7, (key, row)
        # The averaged figure counts new tokens of one sequence over the whole run, prefill included.
        assert row["average_tokens_per_s"] < row["decode_tokens_per_s"] / row["batch"] * 1.5
        assert row["peak_memory_mib"] > 50 and 0 <= row["added_memory_mib"] < row["peak_memory_mib"]
    table = r.stdout.strip().splitlines()
    assert table[0].startswith("| model | weights | KV cache |") and len(table) == 2 + len(rows)
    assert "| int4 g128 | int8 | 3 | 48 | 5 |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "no config.json"),
    (["--kv", "int3"], "--kv must be among"),
    (["--context", 8], "--context >= 32"),
    (["--context", 100000], "beyond 4x the model's max_position_embeddings"),
    (["--dtype", "int8"], "--dtype must be one of"),
])
def test_profile_bad_input_is_one_error_line(tiny_dir, args, message):
    if "--model" not in args:
        args = ["--model", tiny_dir, *args]
    r = run_profile(*args, timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert r.stdout == ""


def test_gpu_check_script_small_mode_runs_every_step_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --small: versions, random 7B-layout checkpoint (tiny dims), Int4 RTN, profiler."""
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--small"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu_check: done" in r.stdout
    for batch in (1, 3):
        rows = json.loads((tmp_path / f"profile_b{batch}.json").read_text())
        assert [(x["weights"], x["kv"], x["batch"]) for x in rows] == [
            ("bfloat16", "float", batch), ("bfloat16", "int8", batch), ("int4 g128", "float", batch),
            ("int4 g128", "int8", batch)]
    assert (tmp_path / "versions.txt").read_text().startswith("python ")
