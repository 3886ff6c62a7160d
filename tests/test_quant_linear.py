"""QuantLinear: output equals x @ W^T + b for the solver's dequantized W, checkpoint loading, and the Triton
kernel (run by the interpreter on CPU) against the torch path."""
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.quant_linear import QuantLinear
from quantize.quantizer import rtn_quantize

triton_dequant_matmul = pytest.importorskip("quantize.triton_dequant_matmul")


def solved_layer(out_features, in_features, bits, group_size, sym=True, desc_act=False, seed=0):
    torch.manual_seed(seed)
    H, _ = accumulate_hessian(None, 0, torch.randn(256, in_features))
    return gptq_quantize(torch.randn(out_features, in_features), H, bits, group_size, sym, desc_act=desc_act)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 32, True, False), (3, 32, False, True),
                                                          (8, -1, True, False), (2, 48, False, False)])
def test_forward_equals_dequantized_matmul(bits, group_size, sym, desc_act):
    res = solved_layer(40, 96, bits, group_size, sym, desc_act)
    bias = torch.randn(40)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, bias, bits, group_size,
                                       kernel="torch")
    assert layer.checkpoint_format == ("gptq" if sym else "gptq_v2")
    x = torch.randn(2, 3, 96)
    expected = x @ res.weight.t() + bias.half().float()
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-5)
    assert torch.allclose(layer.dequantize_weight(torch.float32), res.weight, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    res = solved_layer(64, 128, 4, 64)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, torch.randn(64), 4, 64)
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))
    state = load_file(str(path))
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert state["qweight"].shape == (16, 64) and state["qzeros"].shape == (2, 8)
    fresh = QuantLinear(4, 64, 128, 64, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_torch(bits, dtype):
    in_features, out_features, group_size = 80, 72, 32  # partial last group, N not a multiple of the tile
    res = solved_layer(out_features, in_features, bits, group_size, desc_act=True, seed=bits)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, torch.randn(out_features),
                                       bits, group_size, kernel="triton")
    weight = layer.dequantize_weight(torch.float32)
    for shape in [(1, in_features), (2, 9, in_features), (20, in_features)]:
        x = torch.randn(shape).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_features)
        expected = x.float() @ weight.t() + layer.bias.float()
        if dtype == torch.float32:
            assert torch.allclose(y, expected, atol=1e-4, rtol=1e-4)
        else:
            assert torch.allclose(y.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=1e-2)


def test_triton_v2_zeros_and_rtn_weights():
    res = rtn_quantize(torch.randn(32, 64), 4, 16, sym=False, fp16_scales=True)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 16, kernel="triton")
    assert layer.checkpoint_format == "gptq_v2"
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ res.weight.t(), atol=1e-4, rtol=1e-4)


def test_bad_arguments_and_warnings(caplog):
    with pytest.raises(ValueError, match="Triton kernel supports bits"):
        QuantLinear(3, 32, 64, 64, bias=False, kernel="triton")
    with pytest.raises(ValueError, match="kernel must be"):
        QuantLinear(4, 32, 64, 64, bias=False, kernel="cuda")
    with pytest.raises(ValueError, match="checkpoint_format"):
        QuantLinear(4, 32, 64, 64, bias=False, checkpoint_format="awq")
    with pytest.raises(ValueError, match="expects 64"):
        triton_dequant_matmul.dequant_matmul(torch.randn(2, 32), torch.zeros(8, 64, dtype=torch.int32),
                                             torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 64),
                                             torch.zeros(64, dtype=torch.int32), 4)
    res = solved_layer(32, 96, 4, 40)
    with caplog.at_level(logging.WARNING, logger="quantize.quant_linear"):
        QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 40)
    assert "does not divide in_features" in caplog.text
