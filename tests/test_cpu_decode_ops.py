"""The model's decode ops on CPU (qwen_model/cpu_decode_ops.cpp, AVX-512 and portable builds): the heads and rotary
of c_attn's output bit-identical to the tensor ops they replace, the RMSNorm against the composite formula, the
wrappers' limits, and a model decoding through them."""
import pytest
import torch

from kvcache.rotary import apply_rotary_pos_emb, cos_sin_at, rotary_inv_freq
from qwen_model import cpu_decode_ops
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.create_tiny import TINY_CONFIG
from qwen_model.cpu_decode_ops import qkv_heads_cpu, rms_norm_cpu
from qwen_model.modeling_qwen import QWenLMHeadModel, RMSNorm


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def ops(request):
    module = cpu_decode_ops.load_ops(portable=request.param)
    assert module is not None, "the CPU decode ops must build here (gcc is on every CI machine)"
    return module


def reference_heads(qkv, cos, sin, heads):
    """The model's tensor ops (QWenAttention.forward without the kernel)."""
    b, s, width = qkv.shape
    projection = width // 3
    query_key, value = qkv.split((2 * projection, projection), dim=2)
    query_key = query_key.view(b, s, 2 * heads, -1).transpose(1, 2)
    rotated = apply_rotary_pos_emb(query_key, cos, sin)
    return (rotated[:, :heads], rotated[:, heads:], value.view(b, s, heads, -1).transpose(1, 2),
            query_key[:, heads:])


@pytest.mark.parametrize("b,s,heads,d,per_sample", [(1, 1, 9, 64, False), (3, 1, 2, 128, True), (2, 5, 3, 16, True),
                                                    (1, 2, 1, 6, False)])
def test_qkv_heads_is_bit_identical_to_the_tensor_ops(ops, b, s, heads, d, per_sample):
    g = torch.Generator().manual_seed(b * 100 + d)
    qkv = torch.randn(b, s, 3 * heads * d, generator=g) * 3
    positions = torch.randint(0, 5000, (b, s), generator=g)
    inv_freq = rotary_inv_freq([1.0, 2.5, 1.3][:b] if per_sample else [1.0], d, 10000)
    cos, sin = cos_sin_at(positions if per_sample else positions[:1], inv_freq)
    got = ops.qkv_heads(qkv, cos, sin, heads)
    want = reference_heads(qkv, cos, sin, heads)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and torch.equal(g_, w_)
    assert got[2].data_ptr() == want[2].data_ptr() and got[3].data_ptr() == want[3].data_ptr()  # views, no copies


def test_qkv_heads_reads_a_strided_input_and_passes_non_finite_values(ops):
    qkv = torch.randn(2 * 3 * 48 * 2).as_strided((2, 3, 48), (3 * 48 * 2, 48, 1))  # batch rows apart in memory
    qkv[0, 1, 3] = float("nan")
    qkv[1, 2, 20] = float("inf")
    cos, sin = cos_sin_at(torch.arange(3)[None], rotary_inv_freq([1.0], 8, 10000))
    for g_, w_ in zip(ops.qkv_heads(qkv, cos, sin, 2), reference_heads(qkv, cos, sin, 2)):
        assert torch.equal(g_.isnan(), w_.isnan()) and torch.equal(g_.nan_to_num(), w_.nan_to_num())


def test_qkv_heads_refuses_bad_shapes(ops):
    cos, sin = cos_sin_at(torch.arange(1)[None], rotary_inv_freq([1.0], 8, 10000))
    with pytest.raises(RuntimeError, match="3 x heads"):
        ops.qkv_heads(torch.randn(1, 1, 50), cos, sin, 2)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.qkv_heads(torch.randn(1, 2, 48), cos, sin, 2)  # two positions, one cos row
    with pytest.raises(RuntimeError, match="float32"):
        ops.qkv_heads(torch.randn(1, 1, 48).double(), cos, sin, 2)


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 2, 100), (5, 7), (1, 16)])
def test_rms_norm_matches_the_composite_formula(ops, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x, w = torch.randn(*shape, generator=g) * 4, torch.randn(shape[-1], generator=g)
    want = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()).float()
    got = ops.rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and ((got - want).abs() <= 1e-6 * want.abs() + 1e-7).all()


def test_rms_norm_zero_constant_and_non_finite_rows(ops):
    w = torch.full((40,), 0.5)
    x = torch.stack([torch.zeros(40), torch.full((40,), -3.0), torch.randn(40), torch.randn(40)])
    x[2, 5], x[3, 9] = float("nan"), float("inf")
    got = ops.rms_norm(x, w, 1e-6)
    assert torch.equal(got[0], torch.zeros(40))  # eps keeps zeros finite
    assert torch.allclose(got[1], torch.full((40,), -0.5), rtol=1e-6)
    assert got[2].isnan().all() and not got[3].isfinite().all()
    want = torch.nn.functional.rms_norm(x, (40,), w, 1e-6)
    assert torch.equal(got.isnan(), want.isnan())


def test_wrappers_take_a_few_float32_rows_without_autograd_only():
    cos, sin = cos_sin_at(torch.arange(1)[None], rotary_inv_freq([1.0], 8, 10000))
    x, w = torch.randn(1, 1, 48), torch.ones(48)
    assert qkv_heads_cpu(x, cos, sin, 2) is not None and rms_norm_cpu(x, w, 1e-6) is not None
    assert qkv_heads_cpu(x.bfloat16(), cos, sin, 2) is None and rms_norm_cpu(x.bfloat16(), w, 1e-6) is None
    rows = cpu_decode_ops.DECODE_ROWS + 1  # prefill: the tensor ops, threaded
    cos17, sin17 = cos_sin_at(torch.arange(rows)[None], rotary_inv_freq([1.0], 8, 10000))
    assert qkv_heads_cpu(torch.randn(1, rows, 48), cos17, sin17, 2) is None
    assert rms_norm_cpu(torch.randn(rows, 48), w, 1e-6) is None
    half_cos, half_sin = cos[..., :4], sin[..., :4]  # a rotary over part of each head
    assert qkv_heads_cpu(x, half_cos, half_sin, 2) is None
    grad = torch.randn(1, 1, 48, requires_grad=True)
    assert qkv_heads_cpu(grad, cos, sin, 2) is None and rms_norm_cpu(grad, w, 1e-6) is None
    with torch.no_grad():
        assert rms_norm_cpu(grad, torch.nn.Parameter(w), 1e-6) is not None


def test_model_decodes_through_the_ops_and_norm_stays_differentiable(kernel_calls):
    """A tiny model, batch 2 with left padding: cached greedy decoding (each step through the ops) gives the tokens
    of the uncached forward, the ops really ran, and a training forward still backpropagates through RMSNorm."""
    config = QWenConfig(**{**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64})
    torch.manual_seed(0)
    model = QWenLMHeadModel(config).eval()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with kernel_calls(cpu_decode_ops.load_ops) as calls:
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    layers = config.num_hidden_layers
    assert calls.count("qkv_heads") == 5 * layers and calls.count("rms_norm") == 5 * (2 * layers + 1)
    norm = RMSNorm(128)
    x = torch.randn(1, 1, 128, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
