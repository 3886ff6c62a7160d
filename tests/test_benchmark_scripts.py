"""The CPU kernels' benchmark scripts run end to end on the tiny model (real subprocesses, real files), so they
cannot rot between the runs that fill benchmarks/RESULTS.md; the figures they print are checked for sense, not speed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_int4(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "int4"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out", str(out),
                        "--method", "rtn", "--group-size", "32", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def table_rows(out: str, tiny_dir) -> list:
    """The cells of the printed table's rows, one list per checkpoint."""
    return [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| /", f"| {tiny_dir}"))]


def run(script: str, *args) -> str:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_decode_step_breakdown(tiny_dir, tiny_int4):
    out = run("decode_step_breakdown.py", tiny_dir, tiny_int4, "--context", 16, "--steps", 2, "--threads", 1)
    rows = table_rows(out, tiny_dir)
    assert len(rows) == 2
    for cells in rows:
        step, linears, fused, head, rest = (float(c) for c in cells[1:6])
        assert step > 0 and linears > 0 and fused == 0 and head > 0 and abs(step - linears - fused - head - rest) < 0.02
    assert rows[0][6].strip() == "1.00x"


def test_quant_linear_quality_isolates_the_kernels(tiny_int4):
    out = run("quant_linear_quality.py", tiny_int4, "--windows", 1, "--ctx", 32, "--threads", 1)
    lines = {kernel: line for line in out.splitlines() for kernel in ("int4pack", "auto") if f": {kernel}: " in line}
    errors = {k: [float(v) for v in re.findall(r"error ([0-9.e+-]+) \(([0-9.e+-]+) with", line)[0]]
              for k, line in lines.items()}
    # auto's prefill is the reference's weight and GEMM: bit-identical with the same head; int4pack rounds to bf16
    assert errors["auto"][1] == 0.0
    assert errors["int4pack"][1] > 1e-4


def test_block_linears_speed(tiny_dir, tiny_int4):
    out = run("block_linears_speed.py", tiny_dir, tiny_int4, "--context", 16, "--rounds", 2, "--threads", 1)
    rows = table_rows(out, tiny_dir)
    assert len(rows) == 2
    (float_mb, *_), (int4_mb, *_) = [[float(c) for c in cells[1:5]] for cells in rows]
    assert 3 < float_mb / int4_mb < 8  # float32 weights against 4-bit codes + float16 scales and the bias
    assert rows[0][5].strip() == "1.00x" and float(rows[1][3]) > 0


def test_decode_attention_speed():
    out = run("decode_attention_speed.py", "--contexts", 16, 300, "--layers", 2, "--rounds", 1, "--threads", 1)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| 16 ", "| 300 "))]
    assert [r[1].strip() for r in rows[:3]] == ["fused (attend_float)", "matmul (eager_attention)", "SDPA"]
    assert len(rows) == 6 and all(float(r[2]) > 0 for r in rows) and rows[1][4].strip() == "1.00x"


def test_prefill_speed(tiny_dir, tiny_int4):
    out = run("prefill_speed.py", tiny_dir, tiny_int4, "--context", 40, "--rounds", 2, "--threads", 1)
    rows = table_rows(out, tiny_dir)
    assert len(rows) == 2
    for cells in rows:
        median, low, high, rate = (float(c) for c in cells[1:5])
        assert 0 < low <= median <= high and abs(rate - 40 / (median / 1e3)) < 0.02 * rate
    assert rows[0][5].strip() == "1.00x" and rows[1][5].strip().endswith("x")


def test_stream_and_cold_calls():
    out = run("stream_and_cold_calls.py", "--threads", 1, "--sweep-mb", 8, "--rounds", 2, "--max-mib", 2,
              "--columns", 64, 256)
    bandwidth = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| [12] \|", line)]
    calls = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (64|256) \| \d+ \|", line)]
    assert len(bandwidth) == 2 and all(float(cells[1]) > 0 for cells in bandwidth)
    assert [int(cells[1]) for cells in calls] == [18, 72]  # 576 / 8 words x N x 4 bytes, in KiB
    for cells in calls:
        assert all(float(cell.split("(")[0]) > 0 for cell in cells[2:])
