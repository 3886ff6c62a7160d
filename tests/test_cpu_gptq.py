"""This package's CPU GPTQ kernels (quantize/cpu_gptq_kernels.cpp, -march=native and portable builds) against the
dequantize reference (kernel="torch").

Tolerance: both compute (code - zero) * scale exactly and sum in float32, so float32 outputs differ only by the
order of sums: relative error (Frobenius) below 1e-5 and elementwise below 1e-5 of the largest output (measured
~5e-7). bfloat16/float16 activations: the reference runs its GEMM in that dtype, ours in float32 rounded once at the
end, so they agree to that dtype's rounding (2e-2 / 2e-3 relative).
"""
import logging
import subprocess
import sys

import pytest
import torch

from quantize import cpu_gptq
from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.quant_linear import QuantLinear

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
AVX512 = " avx512f " in open("/proc/cpuinfo").read().replace("\n", " ")


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def kernels(request):
    module = cpu_gptq.load_kernels(portable=request.param)
    assert module is not None, "the CPU GPTQ kernels must build here (g++ and torch's headers)"
    return module


def solved(out_features, in_features, bits, group_size, sym=True, desc_act=False, seed=0):
    torch.manual_seed(seed)
    H, _ = accumulate_hessian(None, 0, torch.randn(256, in_features))
    return gptq_quantize(torch.randn(out_features, in_features), H, bits, group_size, sym, desc_act=desc_act)


def reference(res, bits, group_size, bias=None):
    return QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, bias, bits, group_size,
                                      kernel="torch")


def assert_close(y, ref, dtype=torch.float32):
    y, ref = y.float(), ref.float()
    assert (y - ref).norm() <= TOL[dtype] * ref.norm(), ((y - ref).norm() / ref.norm()).item()
    assert (y - ref).abs().max() <= TOL[dtype] * ref.abs().max()


@pytest.mark.parametrize("bits,group_size,in_features,out_features,sym,desc_act", [
    (4, 32, 128, 64, True, False),
    (4, 128, 576, 96, True, False),     # the last group is partial (576 = 4 x 128 + 64)
    (8, 128, 200, 48, False, False),    # asymmetric (gptq_v2), partial group, in not a multiple of 32
    (2, 32, 96, 40, True, False),
    (4, -1, 100, 33, True, False),      # per-channel, odd sizes
    (4, 20, 100, 32, True, False),      # groups that are not whole words: repacked
    (4, 64, 256, 64, True, True),       # act-order: repacked, inputs gathered
    (8, 32, 160, 64, False, True),
    (2, 48, 144, 16, False, True),
])
@pytest.mark.parametrize("rows", [1, 3, cpu_gptq.GEMV_ROWS - 1, cpu_gptq.GEMV_ROWS, 70])
def test_matches_reference(kernels, bits, group_size, in_features, out_features, sym, desc_act, rows):
    res = solved(out_features, in_features, bits, group_size, sym, desc_act)
    ref = reference(res, bits, group_size, bias=torch.randn(out_features))
    weight = cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, bits, group_size,
                                    ref.checkpoint_format, kernels=kernels, bias=ref.bias)
    x = torch.randn(rows, in_features)
    assert_close(weight.matmul(x), ref(x))  # the bias added by the GEMV (rows < GEMV_ROWS) or after the GEMMs


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_in_chunks_of_groups(kernels, monkeypatch, desc_act, dtype):
    """Prefill dequantizes a chunk of whole groups at a time (CHUNK_BYTES) and sums one GEMM per chunk."""
    monkeypatch.setattr(cpu_gptq, "CHUNK_BYTES", 64 * 48 * 4)  # two 32-column groups of a 48-output layer
    res = solved(48, 200, 4, 32, False, desc_act, seed=8)
    ref = reference(res, 4, 32)
    weight = cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, 4, 32, ref.checkpoint_format,
                                    kernels=kernels)
    assert weight.chunks == [(0, 2), (2, 4), (4, 6), (6, 7)]
    x = torch.randn(2, cpu_gptq.GEMV_ROWS, 200).to(dtype)
    y = weight.matmul(x)
    assert y.dtype == dtype
    assert_close(y, ref(x), dtype)


def test_dequantize_is_the_reference_weight(kernels):
    """The dequantized weight is bit-identical to the reference's (both exact in float32); bfloat16 is its rounding."""
    for desc_act in (False, True):
        res = solved(64, 200, 4, 32, False, desc_act, seed=1)
        ref = reference(res, 4, 32)
        weight = cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, 4, 32, ref.checkpoint_format,
                                        kernels=kernels)
        want = ref.dequantize_weight(torch.float32).t()  # [in, out]
        rows = torch.arange(weight.padded_in) if weight.gather is None else weight.gather
        keep = rows < 200
        for dtype in (torch.float32, torch.bfloat16):
            got = weight.dequantize_transposed(dtype)
            assert got.dtype == dtype and got.shape[0] == weight.padded_in
            assert torch.equal(got[keep], want[rows[keep]].to(dtype))


def test_layout_kept_or_repacked():
    """Groups of whole words read the checkpoint's qweight in place; act-order and odd group sizes hold one copy."""
    res = solved(64, 256, 4, 64)
    ref = reference(res, 4, 64)
    direct = cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, 4, 64, ref.checkpoint_format)
    assert direct.gather is None and direct.words.data_ptr() == ref.qweight.data_ptr()
    assert direct.nbytes() < ref.qweight.numel() * 4 // 4  # only float16 zeros and offsets
    res = solved(64, 256, 4, 64, desc_act=True)
    ref = reference(res, 4, 64)
    repacked = cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, 4, 64, ref.checkpoint_format)
    assert repacked.gather is not None and repacked.words.shape == ref.qweight.shape
    with pytest.raises(ValueError, match="bits"):
        cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, 3, 64, ref.checkpoint_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 40)])
def test_quant_linear_cpu_kernel(dtype, shape):
    """QuantLinear(kernel="cpu" and "auto") in every activation dtype, batch > 1, decode and prefill shapes."""
    if not AVX512:
        pytest.skip("auto takes the CPU kernels only where they are built with AVX-512")
    res = solved(96, 160, 4, 32, False, True, seed=2)
    bias = torch.randn(96)
    ref = reference(res, 4, 32, bias)
    fast = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, bias, 4, 32, kernel="cpu")
    auto = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, bias, 4, 32)
    x = torch.randn(*shape, 160).to(dtype)
    assert fast.kernel_for(x) == auto.kernel_for(x) == "cpu"
    y = fast(x)
    assert y.dtype == dtype and y.shape == (*shape, 96)
    assert_close(y, ref(x), dtype)
    assert torch.equal(auto(x), y)


def test_edge_inputs():
    """Zero and constant rows, and non-finite inputs: non-finite exactly where the reference is."""
    res = solved(64, 128, 8, 32, False, False, seed=5)
    ref = reference(res, 8, 32)
    fast = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 8, 32, kernel="cpu")
    x = torch.stack([torch.zeros(128), torch.full((128,), 3.5), torch.randn(128)])
    assert torch.equal(fast(x)[0], torch.zeros(64))
    assert_close(fast(x), ref(x))
    x[2, 7] = float("nan")
    x[1, 0] = float("inf")
    y, want = fast(x), ref(x)
    assert torch.equal(torch.isfinite(y), torch.isfinite(want))
    assert not torch.isfinite(y[1:]).any() and torch.equal(y[0], torch.zeros(64))


def cpu_layer(kernels, out_features, in_features, bits, group_size, sym=True, desc_act=False, seed=0, bias=True):
    res = solved(out_features, in_features, bits, group_size, sym, desc_act, seed)
    ref = reference(res, bits, group_size, bias=torch.randn(out_features) if bias else None)
    return ref, cpu_gptq.CpuGptqWeight(ref.qweight, ref.qzeros, ref.scales, ref.g_idx, bits, group_size,
                                       ref.checkpoint_format, kernels=kernels, bias=ref.bias)


@pytest.mark.parametrize("bits,group_size,hidden,ff,rows,sym,bias", [
    (4, 128, 576, 160, 1, True, False),  # SmolLM2's hidden size: a partial last group
    (4, 32, 96, 160, 3, False, True),    # asymmetric
    (8, 32, 64, 96, cpu_gptq.GEMV_ROWS - 1, False, True),
    (2, 64, 128, 96, 2, True, False),    # a partial last group in c_proj
    (8, -1, 64, 32, 1, True, True),      # per-channel
])
def test_gated_mlp_is_the_three_layers(kernels, bits, group_size, hidden, ff, rows, sym, bias):
    """c_proj(w1(x) * silu(w2(x))) in one call equals the three GEMVs and F.silu to the bit, and the reference
    layers to float32 rounding."""
    ref1, w1 = cpu_layer(kernels, ff, hidden, bits, group_size, sym, seed=1, bias=bias)
    ref2, w2 = cpu_layer(kernels, ff, hidden, bits, group_size, sym, seed=2, bias=bias)
    ref3, c_proj = cpu_layer(kernels, hidden, ff, bits, group_size, sym, seed=3, bias=bias)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
    got = cpu_gptq.gated_mlp(x, w1, w2, c_proj)
    assert torch.equal(got, c_proj.matmul(w1.matmul(x) * torch.nn.functional.silu(w2.matmul(x))))
    assert_close(got, ref3(ref1(x) * torch.nn.functional.silu(ref2(x))))


def test_gated_mlp_refuses_layers_that_do_not_chain(kernels):
    _, w1 = cpu_layer(kernels, 64, 96, 4, 32)
    _, w2 = cpu_layer(kernels, 32, 96, 4, 32)
    _, c_proj = cpu_layer(kernels, 96, 64, 4, 32)
    x = torch.randn(1, 96)
    with pytest.raises(RuntimeError, match="w1 and w2 must have the same outputs"):
        cpu_gptq.gated_mlp(x, w1, w2, c_proj)
    with pytest.raises(RuntimeError, match="c_proj must take w1's outputs"):
        cpu_gptq.gated_mlp(x, w1, w1, w1)
    with pytest.raises(RuntimeError, match="x must have 32 / bits columns per word"):
        cpu_gptq.gated_mlp(torch.randn(1, 64), w1, w1, c_proj)
    with pytest.raises(RuntimeError, match=r"a layer is \(words, scales, zeros, group_words, bias or None\)"):
        kernels.gated_mlp(x, w1.layer()[:4], w1.layer(), c_proj.layer(), 4)


def test_gated_mlp_cpu_takes_only_layers_it_computes_exactly(caplog, monkeypatch):
    """quant_linear.gated_mlp_cpu fuses three QuantLinear layers once their forward has chosen the CPU kernels, for
    float32 decode rows; act-order layers (inputs gathered), other dtypes, prefill rows and the torch kernel go
    through the layers one by one (None)."""
    from quantize import quant_linear
    from quantize.quant_linear import gated_mlp_cpu

    monkeypatch.setattr(quant_linear, "_logged", set())  # logged once per process: this test sees the first time

    def layers(desc_act, kernel):
        made = []
        for seed, (out_features, in_features) in enumerate([(64, 96), (64, 96), (96, 64)]):
            res = solved(out_features, in_features, 4, 32, desc_act=desc_act, seed=seed)
            made.append(QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 32,
                                                   kernel=kernel))
        return made

    x = torch.randn(2, 1, 96)
    plain = layers(False, "cpu")
    assert gated_mlp_cpu(x, *plain) is None  # no forward yet: nothing chosen
    w1, w2, c_proj = plain
    want = c_proj(w1(x) * torch.nn.functional.silu(w2(x)))
    with caplog.at_level(logging.INFO, logger="quantize.quant_linear"):
        got = gated_mlp_cpu(x, *plain)
        gated_mlp_cpu(x, *plain)
    assert got.shape == (2, 1, 96) and torch.equal(got, want)
    assert [r.getMessage() for r in caplog.records if "gated_mlp" in r.getMessage()] == [
        "QuantLinear: 4-bit SwiGLU MLPs of decoded tokens run as one gated_mlp call of the CPU kernels"]
    assert gated_mlp_cpu(x.double(), *plain) is None
    assert gated_mlp_cpu(torch.randn(cpu_gptq.GEMV_ROWS, 96), *plain) is None
    for desc_act, kernel in [(True, "cpu"), (False, "torch")]:
        w1, w2, c_proj = other = layers(desc_act, kernel)
        c_proj(w1(x) * torch.nn.functional.silu(w2(x)))
        assert gated_mlp_cpu(x, *other) is None


@pytest.mark.parametrize("rows,k", [(1, 576), (3, 100), (5, 16), (2, 7)])
def test_half_linear(kernels, rows, k):
    """float16 weight [N, K] times float32 rows, in float32: vector body, 16-wide and scalar tails."""
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(70, k, generator=g) * 0.1).half()
    x = torch.randn(rows, k, generator=g)
    want = x.double() @ w.double().t()
    y = kernels.half_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (rows, 70)
    assert (y.double() - want).norm() <= 1e-6 * want.norm()
    with pytest.raises(RuntimeError, match="same number of columns"):
        kernels.half_linear(x, w[:, :-1].contiguous())


def test_vectorized_build_where_the_cpu_has_avx512():
    """On an AVX-512 CPU (this box, CI) "auto" takes the kernels; the portable build says it is not vectorized."""
    assert not cpu_gptq.load_kernels(portable=True).vectorized
    assert (cpu_gptq.fast_kernels() is not None) == AVX512


def test_forced_cpu_kernel_refuses_3_bits():
    with pytest.raises(ValueError, match="CPU GPTQ kernels support bits"):
        QuantLinear(3, 32, 64, 32, False, kernel="cpu")


def test_state_dict_and_reload(tmp_path):
    """The prepared weight is not in state_dict, and new buffers (load_state_dict, .to()) are prepared again."""
    res, other = solved(32, 64, 4, 32, seed=6), solved(32, 64, 4, 32, seed=7)
    fast = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 32, kernel="cpu")
    x = torch.randn(2, 64)
    fast(x)
    assert "cpu" in fast._prepared and set(fast.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    other_ref = reference(other, 4, 32)
    fast.load_state_dict(other_ref.state_dict())
    assert_close(fast(x), other_ref(x))
    fast.to(torch.float32)
    assert "cpu" not in fast._prepared
    assert_close(fast(x), other_ref(x))


def test_copy_and_pickle_after_a_forward():
    """A prepared layer (its CPU weight holds the compiled extension) deep-copies and pickles; the copy prepares its
    own weight and computes the same."""
    import copy
    import pickle

    res = solved(32, 64, 4, 32, seed=9)
    fast = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 32, kernel="cpu")
    x = torch.randn(2, 64)
    want = fast(x)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert clone._prepared == {} and torch.equal(clone(x), want) and "cpu" in clone._prepared
    assert "cpu" in fast._prepared


def test_kernel_setting_changed_after_a_forward():
    """forward remembers its CPU choice per `kernel` setting: set to "torch" afterwards, the layer runs the reference
    path (bit-identical to a fresh kernel="torch" layer), and back on "cpu" the kernels again."""
    res = solved(48, 96, 4, 32, seed=8)
    ref = reference(res, 4, 32)
    layer = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, None, 4, 32, kernel="cpu")
    x = torch.randn(1, 96)
    fast = layer(x)
    layer.kernel = "torch"
    assert torch.equal(layer(x), ref(x)) and not torch.equal(fast, ref(x))
    layer.kernel = "cpu"
    assert torch.equal(layer(x), fast)


@pytest.fixture(scope="module", params=[4, 8])
def cli_checkpoint(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"int{request.param}") / "ckpt"
    r = subprocess.run([sys.executable, "-m", f"quantize.gptq_int{request.param}", "--model", str(tiny_dir),
                        "--out", str(out), "--method", "rtn", "--group-size", "32", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_model_logits_match_reference(cli_checkpoint, qwen_tokenizer):
    """A whole model through the CPU kernels (prefill, then decode through generate) computes the reference's
    logits to float32 rounding, and greedy decoding is the same."""
    from qwen_model.modeling_qwen import QWenLMHeadModel

    fast = QWenLMHeadModel.from_pretrained(cli_checkpoint, gptq_kernel="cpu")
    ref = QWenLMHeadModel.from_pretrained(cli_checkpoint, gptq_kernel="torch")
    ids = torch.tensor([qwen_tokenizer("Quantized layers must compute what the reference computes.")["input_ids"]])
    assert fast.transformer.h[0].mlp.w1.kernel_for(ids[:, :1].float()) == "cpu"
    fast.lm_head = ref.lm_head  # the float16 head (quantize.float16_linear) is tested on its own
    with torch.no_grad():
        got, want = fast(ids).logits, ref(ids).logits
        assert (got - want).norm() / want.norm() < 1e-5
        kwargs = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(fast.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_model_decodes_through_the_fused_mlp(cli_checkpoint, qwen_tokenizer, monkeypatch):
    """generate() on the CPU kernels runs each decoded token's MLP as one gated_mlp call, with the logits of the
    three layers called one by one to the bit."""
    from qwen_model import modeling_qwen
    from qwen_model.modeling_qwen import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(cli_checkpoint, gptq_kernel="cpu")
    ids = torch.tensor([qwen_tokenizer("One call for the whole MLP of a token.")["input_ids"]])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    fused_calls = []
    real = modeling_qwen.gated_mlp_cpu

    def counted(*args):
        out = real(*args)
        fused_calls.append(out is not None)
        return out

    with torch.no_grad():
        monkeypatch.setattr(modeling_qwen, "gated_mlp_cpu", counted)
        fused = model.generate(ids, **kwargs)
        monkeypatch.setattr(modeling_qwen, "gated_mlp_cpu", lambda *args: None)
        unfused = model.generate(ids, **kwargs)
    layers = model.config.num_hidden_layers
    assert fused_calls.count(True) == 5 * layers  # the 5 decode steps after the prefill
    assert torch.equal(fused.sequences, unfused.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.logits, unfused.logits))
