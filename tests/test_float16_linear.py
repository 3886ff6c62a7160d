"""Float16Linear (a GPTQ model's lm_head kept in float16) against float32 F.linear on the same float16 weights."""
import pytest
import torch
import torch.nn.functional as F

from quantize.float16_linear import FLOAT16_ROWS, Float16Linear


def _layer(bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=g) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(200, generator=g))
    return linear, Float16Linear.from_linear(linear)


def _reference(linear, x):
    w = linear.weight.half().double()
    b = None if linear.bias is None else linear.bias.half().double()
    return F.linear(x.double(), w, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 1, 96), (2, 5, 96), (1, FLOAT16_ROWS + 7, 96)])
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-float16"])
def test_matches_float32_product_of_the_stored_weights(bias, shape, kernels, monkeypatch):
    from quantize import cpu_gptq

    if kernels:
        if cpu_gptq.fast_kernels() is None:
            pytest.skip("the CPU kernels run Float16Linear only where they are built with AVX-512")
    else:
        monkeypatch.setattr(cpu_gptq, "fast_kernels", lambda: None)
    linear, half = _layer(bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    y = half(x)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 200)
    want = _reference(linear, x)
    rel = ((y.double() - want).norm() / want.norm()).item()
    rows = x.numel() // 96
    # few rows: the kernels' float32 sums, or torch's float16 activations and output (~3e-4); many rows: the exact
    # float32 product
    assert rel < (2e-3 if rows < FLOAT16_ROWS and not kernels else 1e-6), rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_activation_dtypes(dtype):
    linear, half = _layer(True)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = half(x)
    assert y.dtype == dtype
    want = _reference(linear, x)
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-2


def test_state_dict_keys_and_float16_storage():
    linear, half = _layer(True)
    state = half.state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].dtype == torch.float16
    assert torch.equal(state["weight"], linear.weight.half())
    assert half.weight.nbytes == linear.weight.nbytes // 2


def test_cast_module_behaves_as_a_linear():
    linear, half = _layer(False)
    half.float()
    x = torch.randn(2, 96)
    assert torch.allclose(half(x), F.linear(x, linear.weight.half().float()), atol=1e-6)


def test_evaluation_loads_the_reference_and_from_pretrained_the_fast_path(tiny_dir, tmp_path):
    """`load_model` (what perplexity evaluation uses) measures the checkpoint's exact weights: QuantLinear's
    dequantize reference and the float32 lm_head; `from_pretrained` serves with "auto" and the float16 head."""
    from quantize.native_checkpoint import load_model
    from quantize.quant_linear import QuantLinear
    from quantize.quantize_model import QuantizeSettings, quantize_checkpoint
    from qwen_model.modeling_qwen import QWenLMHeadModel

    out = quantize_checkpoint(tiny_dir, tmp_path / "int4", QuantizeSettings(bits=4, group_size=32, method="rtn"))
    evaluated, served = load_model(out), QWenLMHeadModel.from_pretrained(out)
    kernels = {m.kernel for m in evaluated.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"torch"}
    assert type(evaluated.lm_head) is torch.nn.Linear and evaluated.lm_head.weight.dtype == torch.float32
    assert {m.kernel for m in served.modules() if isinstance(m, QuantLinear)} == {"auto"}
    assert isinstance(served.lm_head, Float16Linear)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        fast, exact = served(ids).logits, evaluated(ids).logits
    assert 0 < ((fast - exact).norm() / exact.norm()).item() < 2e-2  # bfloat16 kernels and float16 head: close
