"""`python -m qwen_model.profile` end to end on the tiny model and its Int4 checkpoint (real subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_model.profile import TEXT_FILE, prompt_ids
from qwen_model.tokenization_qwen import load_tokenizer

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


def check_row(row):
    assert row["generate"] == 5 and row["threads"] == 1 and row["device"] == "cpu"
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "average_tokens_per_s"):
        assert 0 < row[key] < 1e7, (key, row)
    # The averaged figure counts new tokens of one sequence over the whole generate(), prefill included.
    assert row["average_tokens_per_s"] < row["decode_tokens_per_s"] / row["batch"] * 1.5
    assert abs(row["prefill_s"] + row["decode_s"] - row["total_s"]) < 1e-6
    assert row["peak_memory_mib"] > 50 and 0 <= row["added_memory_mib"] < row["peak_memory_mib"]
    assert row["peak_reset"]


def test_profile_table_weights_by_cache_by_batch(tiny_dir, tiny_int4, tmp_path):
    out_json = tmp_path / "rows.json"
    r = run_profile("--model", tiny_dir, tiny_int4, "--kv", "float", "int4", "--context", 48, "--generate", 5,
                    "--batch", 1, 3, "--threads", 1, "--device", "cpu", "--json", out_json)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out_json.read_text())
    assert [(Path(x["model"]).name, x["weights"], x["kv"], x["batch"]) for x in rows] == [
        (tiny_dir.name, "float32", kv, b) for kv in ("float", "int4") for b in (1, 3)] + [
        ("int4", "int4 g128", kv, b) for kv in ("float", "int4") for b in (1, 3)]
    for row in rows:
        check_row(row)
        assert row["context"] == 48 and row["input"] == "text"
    table = r.stdout.strip().splitlines()
    assert table[0].startswith("| model | weights | KV cache |") and table[2 + len(rows)] == ""
    assert "| int4 | int4 g128 | int4 | 3 | 48 | 5 |" in r.stdout
    assert "1.00x" in table[2] and "profile" in r.stderr  # ratio column, progress bar


def test_profile_int8_cache_random_ids_several_contexts(tiny_dir, tmp_path):
    out_json = tmp_path / "rows.json"
    r = run_profile("--model", tiny_dir, "--kv", "int8", "--context", 40, 56, "--generate", 5, "--batch", 2,
                    "--threads", 1, "--input", "random", "--repeats", 2, "--device", "cpu", "--json", out_json)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out_json.read_text())
    assert [(x["kv"], x["context"], x["repeats"], x["input"]) for x in rows] == [
        ("int8", 40, 2, "random"), ("int8", 56, 2, "random")]
    for row in rows:
        check_row(row)
    assert "random ids" in r.stdout


def test_text_prompt_is_the_real_tokenizer_on_the_held_out_text(tiny_dir):
    ids = prompt_ids(str(tiny_dir), batch=2, context=30, kind="text", vocab_size=151936)
    assert ids.shape == (2, 30) and torch.equal(ids[1, :-1], ids[0, 1:])
    assert TEXT_FILE.read_text().startswith(load_tokenizer(tiny_dir).decode(ids[0].tolist()))


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "model directory not found"),
    (["--kv", "int3"], "--kv must be among"),
    (["--batch", 0], "--batch must be a positive integer"),
    (["--context", 100000], "beyond 4x the model's max_position_embeddings"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--input", "words"], "--input must be one of"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_profile_bad_input_is_one_error_line(tiny_dir, args, message):
    if "--model" not in args:
        args = ["--model", tiny_dir, *args]
    r = run_profile(*args, timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert r.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_profile_cuda_without_cuda_is_an_error(tiny_dir):
    r = run_profile("--model", tiny_dir, "--device", "cuda", timeout=120)
    assert r.returncode == 1 and "CUDA is not available" in r.stderr


def test_gpu_check_script_small_mode_runs_every_step_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --small: versions, random 7B-layout checkpoint (tiny dims), Int4 RTN, profiler."""
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--small"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu_check: done" in r.stdout
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert [(x["weights"], x["kv"], x["batch"]) for x in rows] == [
        (w, kv, b) for w in ("bfloat16", "int4 g128") for kv in ("float", "int8") for b in (1, 3)]
    assert (tmp_path / "profile.md").read_text().startswith("| model | weights | KV cache |")
    assert (tmp_path / "versions.txt").read_text().startswith("python ")
