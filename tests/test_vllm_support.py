"""vLLM's GPTQ shape and setting rules (quantize.vllm_support) against the figures of Qwen-7B and Qwen-14B."""
import pytest

from qwen_model.configuration_qwen import QWenConfig
from quantize.vllm_support import (GPTQ, MARLIN, TP_SIZES, describe, setting_problems, setting_warnings,
                                   shape_problems, supported_kernels)

INT4_G128 = {"bits": 4, "group_size": 128, "sym": True}
INT8_G128 = {"bits": 8, "group_size": 128, "sym": True}


def qwen(size: str, ffn: int | None = None) -> QWenConfig:
    """Qwen-7B (hidden 4096, 32 heads, FFN 11008) or Qwen-14B (5120, 40 heads, FFN 13696) shapes."""
    hidden, heads, default_ffn = {"7B": (4096, 32, 11008), "14B": (5120, 40, 13696)}[size]
    return QWenConfig(hidden_size=hidden, num_attention_heads=heads, kv_channels=128,
                      intermediate_size=2 * (ffn or default_ffn))


@pytest.mark.parametrize("qc", [INT4_G128, INT8_G128])
def test_qwen_7b_fails_marlin_at_tp_4_and_8_on_mlp_c_proj(qc):
    config = qwen("7B")
    assert [tp for tp in TP_SIZES if MARLIN in supported_kernels(config, qc, tp)] == [1, 2]
    assert "mlp.c_proj K per rank 2752 is not a multiple of 128" in shape_problems(config, qc, 4)[MARLIN]
    assert "mlp.c_proj K per rank 1376 is not a multiple of 128" in shape_problems(config, qc, 8)[MARLIN]
    # the non-Marlin gptq kernel needs whole groups per rank: 2752 = 21.5 groups of 128, so it fails too
    assert "mlp.c_proj K per rank 2752 is not a multiple of group size 128" in shape_problems(config, qc, 4)[GPTQ]
    assert supported_kernels(config, qc, 4) == []


@pytest.mark.parametrize("qc", [INT4_G128, INT8_G128])
def test_qwen_14b_fails_at_tp_2_and_up(qc):
    config = qwen("14B")
    assert supported_kernels(config, qc, 1) == [MARLIN, GPTQ]
    assert all(supported_kernels(config, qc, tp) == [] for tp in (2, 4, 8))
    assert "mlp.c_proj K per rank 6848 is not a multiple of 128" in shape_problems(config, qc, 2)[MARLIN]


@pytest.mark.parametrize("size, padded", [("7B", 11264), ("14B", 14336)])
@pytest.mark.parametrize("qc", [INT4_G128, INT8_G128])
def test_padded_ffn_runs_marlin_at_every_tp(size, padded, qc):
    config = qwen(size, padded)
    for tp in TP_SIZES:
        assert supported_kernels(config, qc, tp) == [MARLIN, GPTQ], (tp, shape_problems(config, qc, tp))
    assert describe(config, qc)[-1] == "vLLM tensor-parallel 8: gptq_marlin, gptq"


def test_settings_marlin_cannot_run():
    assert setting_problems({"bits": 3, "group_size": 128, "sym": True})[MARLIN] == ["runs 4/8-bit only, not 3-bit"]
    assert setting_problems({"bits": 4, "group_size": 128, "sym": False})[MARLIN] == ["runs symmetric grids only"]
    assert setting_problems({"bits": 4, "group_size": 256, "sym": True})[MARLIN] == \
        ["runs group sizes (-1, 32, 64, 128) only, not 256"]
    assert setting_problems(INT4_G128, dtype="bfloat16")[GPTQ] == ["runs in float16 only, config.json says bfloat16"]
    assert setting_problems(INT4_G128) == {MARLIN: [], GPTQ: []}
    config = qwen("7B", 11264)
    assert supported_kernels(config, {"bits": 3, "group_size": 128, "sym": True}, 8) == [GPTQ]
    assert supported_kernels(config, {"bits": 4, "group_size": -1, "sym": True}, 8) == [MARLIN, GPTQ]


def test_heads_must_split_over_ranks():
    config = QWenConfig(hidden_size=1536, num_attention_heads=12, kv_channels=128, intermediate_size=2 * 8192)
    assert "12 attention heads do not split over 8 ranks" in shape_problems(config, INT4_G128, 8)[MARLIN]
    assert supported_kernels(config, INT4_G128, 4) == [MARLIN, GPTQ]


def test_warnings():
    config = qwen("7B")
    assert setting_warnings(config, INT4_G128) == []
    warnings = setting_warnings(config, {"bits": 3, "group_size": 96, "sym": False})
    assert any("group size 96: vLLM's gptq_marlin runs only group sizes -1/32/64/128" in w for w in warnings)
    assert any("does not divide the input widths [4096, 11008]" in w for w in warnings)
    assert any("gptq_v2" in w for w in warnings) and any(w.startswith("3-bit") for w in warnings)
