"""The CPU int4pack kernel (torch's `_weight_int4pack_mm_for_cpu`) against the dequantize reference (kernel="torch").

Tolerance: the kernel runs in bfloat16 (activations, scales, zero terms and output rounded to 8 significant bits),
so outputs agree with the float32 reference to a relative error (Frobenius) below 1e-2 and an elementwise error
below 2e-2 of the largest output; measured about 4e-3.
"""
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize import int4pack_cpu
from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.quant_linear import QuantLinear

REL_TOL = 1e-2
MAX_TOL = 2e-2


def solved(out_features, in_features, bits, group_size, sym, desc_act, seed=0):
    torch.manual_seed(seed)
    H, _ = accumulate_hessian(None, 0, torch.randn(256, in_features))
    return gptq_quantize(torch.randn(out_features, in_features), H, bits, group_size, sym, desc_act=desc_act)


def pair(res, bits, group_size, bias=True):
    b = torch.randn(res.codes.shape[0]) if bias else None
    layers = [QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, b, bits, group_size,
                                         kernel=k) for k in ("int4pack", "torch")]
    return layers


def assert_close(y, ref):
    err = (y.float() - ref).norm() / ref.norm()
    assert err < REL_TOL, err
    assert (y.float() - ref).abs().max() < MAX_TOL * ref.abs().max()


# (bits, group_size, sym, desc_act, in_features, out_features): act-order, partial last groups, asymmetric (v2)
# zeros, per-channel, out_features not a multiple of 16, group sizes the kernel tiles with smaller groups (192)
CASES = [(4, 128, True, False, 256, 64), (4, 128, False, True, 300, 40), (4, 32, False, False, 96, 33),
         (8, 128, True, False, 576, 48), (8, 64, False, True, 160, 40), (8, -1, True, False, 200, 32),
         (3, 32, False, True, 96, 40), (3, 128, True, False, 256, 16), (2, 64, False, True, 160, 48),
         (2, 192, True, False, 384, 32)]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,in_features,out_features", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dequantize_reference(bits, group_size, sym, desc_act, in_features, out_features, dtype):
    res = solved(out_features, in_features, bits, group_size, sym, desc_act, seed=bits)
    fast, ref = pair(res, bits, group_size)
    for shape in [(1, in_features), (3, in_features), (2, 7, in_features), (1, 33, in_features)]:
        x = torch.randn(shape).to(dtype)
        assert fast.kernel_for(x) == "int4pack"
        y = fast(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_features)
        assert_close(y, ref(x.float()))


def test_zero_rows_and_no_bias():
    res = solved(32, 128, 4, 64, True, False)
    fast, ref = pair(res, 4, 64, bias=False)
    x = torch.randn(4, 128)
    x[1] = 0
    y = fast(x)
    assert torch.equal(y[1], torch.zeros(32))
    assert_close(y, ref(x))


def test_repacked_once_without_float_weight():
    res = solved(64, 256, 4, 128, True, False)
    fast, _ = pair(res, 4, 128)
    x = torch.randn(2, 256)
    fast(x)
    packed = fast.int4pack_weight()
    fast(x)
    assert fast.int4pack_weight() is packed
    assert packed.weight.dtype == torch.uint8 and packed.gather is None
    assert packed.nbytes() <= 256 * 64 // 2 + 2 * 64 * 2 * 2  # half a byte per weight + bf16 scale/zero per group


def test_state_dict_stays_standard_and_reload_repacks(tmp_path):
    res = solved(64, 256, 8, 128, False, True)
    fast, ref = pair(res, 8, 128)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    x = torch.randn(3, 256)
    y = fast(x)
    state = fast.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert all(torch.equal(state[k], before[k]) for k in before)
    path = tmp_path / "layer.safetensors"
    save_file(state, str(path))
    fresh = QuantLinear(8, 128, 256, 64, bias=True, checkpoint_format="gptq_v2", kernel="int4pack")
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh(x), y)
    other = solved(64, 256, 8, 128, False, True, seed=5)
    _, other_ref = pair(other, 8, 128)
    fresh.load_state_dict(other_ref.state_dict())  # new weights after a forward: repacked, not stale
    assert_close(fresh(x), other_ref(x))


def test_unsupported_group_size_falls_back_logged_once(caplog):
    res = solved(32, 96, 4, 48, True, False)
    fast, ref = pair(res, 4, 48)
    x = torch.randn(2, 96)
    assert not int4pack_cpu.supports(4, 48, 96)
    with caplog.at_level(logging.INFO, logger="quantize.quant_linear"):
        assert torch.equal(fast(x), ref(x))
        fast(x)
    assert fast.kernel_for(x) == "torch"
    assert sum("torch (dequantize) path" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="multiples of 32"):
        int4pack_cpu.Int4PackWeight(res.codes, res.zeros, res.scales, res.g_idx, 4, 48)


def test_auto_takes_int4pack_for_3_bits_on_cpu():
    """3-bit codes straddle int32 words, which this package's CPU kernels do not read: "auto" takes int4pack."""
    res = solved(32, 64, 3, 32, True, False, seed=3)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 3, 32)
    x = torch.randn(1, 64)
    assert layer.kernel == "auto" and layer.kernel_for(x) == "int4pack"
    assert "kernel=auto" in repr(layer)
    layer(x)
    assert "int4pack" in layer._prepared


@pytest.fixture(scope="module", params=[4, 8])
def cli_checkpoint(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"int{request.param}") / "ckpt"
    r = subprocess.run([sys.executable, "-m", f"quantize.gptq_int{request.param}", "--model", str(tiny_dir),
                        "--out", str(out), "--method", "rtn", "--group-size", "32", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_checkpoint_loads_and_matches_reference(cli_checkpoint, qwen_tokenizer):
    from qwen_model.modeling_qwen import QWenLMHeadModel

    fast = QWenLMHeadModel.from_pretrained(cli_checkpoint, gptq_kernel="int4pack")
    ref = QWenLMHeadModel.from_pretrained(cli_checkpoint, gptq_kernel="torch")
    layer = fast.transformer.h[0].mlp.w1
    assert layer.kernel == "int4pack" and ref.transformer.h[0].mlp.w1.kernel == "torch"
    ids = torch.tensor([qwen_tokenizer("Quantized layers must compute what the reference computes.")["input_ids"]])
    with torch.no_grad():
        got, want = fast(ids).logits, ref(ids).logits
    # the tiny model's random weights amplify bfloat16 rounding through its blocks more than real weights do
    assert (got - want).norm() / want.norm() < 3 * REL_TOL
    assert layer.kernel_for(ids.float()) == "int4pack" and "int4pack" in layer._prepared
    saved = fast.state_dict()
    assert not any("int4pack" in k for k in saved)
    # the fast model keeps the lm_head in the float16 the GPTQ checkpoint declares (quantize.float16_linear)
    assert fast.lm_head.weight.dtype == torch.float16 and ref.lm_head.weight.dtype == torch.float32
    assert all(torch.equal(saved[k], v.to(saved[k].dtype)) for k, v in ref.state_dict().items())


def test_auto_prefill_rows_take_the_dequantize_path():
    """Where "auto" uses int4pack (3 bits), inputs of PREFILL_ROWS rows or more take the float dequantize path."""
    from quantize.quant_linear import PREFILL_ROWS

    res = solved(32, 128, 3, 64, False, True, seed=4)
    auto = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 3, 64)
    _, ref = pair(res, 3, 64, bias=False)
    long, short = torch.randn(1, PREFILL_ROWS, 128), torch.randn(2, PREFILL_ROWS // 2 - 1, 128)
    assert auto.kernel_for(long) == "torch"
    assert auto.kernel_for(short) == "int4pack"
    assert torch.equal(auto(long), ref(long))
    assert_close(auto(short), ref(short))
