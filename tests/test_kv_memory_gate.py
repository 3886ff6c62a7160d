"""CI memory gate: exact KV-cache bytes of Qwen-7B-shaped caches, int8 <= 0.52 and 4-bit <= 0.28 of bf16.

4-bit keys use the default channel_groups layout: per (head, group of 64 positions) one bf16 scale and zero per
channel, plus every slot's int32 rotary position (once per layer and batch row); the cells' lengths are multiples of
64, so no float residual is left."""
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kv_memory.py"
_spec = importlib.util.spec_from_file_location("kv_memory", _PATH)
kv_memory = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kv_memory", kv_memory)  # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(kv_memory)

LAYERS, HEADS, HEAD_DIM = 32, 32, 128


@pytest.mark.parametrize("batch,seq", ((1, 512), (4, 1024)))
def test_quantized_cache_ratio_gate(batch, seq):
    cell = kv_memory.measure_cell(batch, seq, budget_bytes=16 << 20)
    tokens = LAYERS * batch * HEADS * seq * 2  # K and V rows of head_dim
    assert cell.bf16_bytes == tokens * HEAD_DIM * 2
    assert cell.int8_bytes == tokens * (HEAD_DIM + 2 + 2)  # uint8 payload + bf16 scale + bf16 zero
    groups = LAYERS * batch * HEADS * seq // 64
    int4_keys = tokens // 2 * HEAD_DIM // 2 + groups * HEAD_DIM * (2 + 2) + LAYERS * batch * seq * 4
    assert cell.int4_bytes == int4_keys + tokens // 2 * (HEAD_DIM // 2 + 2 + 2)
    assert cell.int8_bytes / cell.bf16_bytes <= 0.52
    assert cell.int4_bytes / cell.bf16_bytes <= 0.28
    assert kv_memory.kv_ratio(8, batch, seq, budget_bytes=16 << 20) <= 0.52


def test_scaling_up_matches_a_direct_fill():
    direct = kv_memory.measure_cell(2, 64, budget_bytes=1 << 30, cfg={**kv_memory.QWEN_7B, "layers": 3})
    scaled = kv_memory.measure_cell(2, 64, budget_bytes=64 * 1024, cfg={**kv_memory.QWEN_7B, "layers": 3})
    assert (direct.filled_layers, direct.filled_batch) == (3, 2)
    assert scaled.filled_layers * scaled.filled_batch < 6
    assert (direct.bf16_bytes, direct.int8_bytes, direct.int4_bytes) == (
        scaled.bf16_bytes, scaled.int8_bytes, scaled.int4_bytes)


def test_qwen7b_parameter_count():
    # 7.72B parameters -> ~15.4 GB of bf16 weights, as published for Qwen-7B
    assert kv_memory.qwen7b_param_count() == 7_721_324_544
