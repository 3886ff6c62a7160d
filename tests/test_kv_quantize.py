"""Tests for kvcache.quantize_cache: original-Qwen chunk arithmetic, token granularity, 4-bit packing, edge cases."""
import pytest
import torch

from kvcache.quantize_cache import dequantize_cache_torch, pack_int4, quantize_cache_v, unpack_int4

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def original_qwen_quantize(fdata, bits, qmax, qmin):
    """Written-out copy of the original Qwen `quantize_cache_v` (bits unused there too)."""
    qtype = torch.uint8
    device = fdata.device
    shape = fdata.shape
    fdata_cal = torch.flatten(fdata, 2)
    fmax = torch.amax(fdata_cal, dim=-1, keepdim=True)
    fmin = torch.amin(fdata_cal, dim=-1, keepdim=True)
    if qmax.device != fmax.device:
        qmax = qmax.to(device)
        qmin = qmin.to(device)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    scale = scale.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    zero = zero.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    res_data = fdata / scale + zero
    qdata = torch.clamp(res_data, qmin, qmax).to(qtype)
    return qdata.contiguous(), scale, zero


def _tol(dtype):
    # One rounding of the dequantized product in `dtype`, relative to the row's largest magnitude.
    return {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", (torch.float32, torch.float16))
def test_chunk_mode_matches_original_bit_for_bit(dtype, qdtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 7, 16) * 3 + 0.5).to(dtype)
    qmax, qmin = torch.tensor(255, dtype=qdtype), torch.tensor(0, dtype=qdtype)
    q, s, z = quantize_cache_v(x, 8, qmax, qmin, granularity="chunk")
    rq, rs, rz = original_qwen_quantize(x, 8, qmax, qmin)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert s.shape == (2, 3, 7, 1) and s.dtype == rs.dtype and z.dtype == rz.dtype
    assert torch.equal(q, rq)
    assert torch.equal(s, rs)
    assert torch.equal(z, rz)


def test_chunk_mode_ignores_bits_like_original():
    x = torch.randn(1, 2, 5, 8)
    qmax, qmin = torch.tensor(15.0), torch.tensor(0.0)
    q4 = quantize_cache_v(x, 4, qmax, qmin, granularity="chunk")
    q8 = quantize_cache_v(x, 8, qmax, qmin, granularity="chunk")
    ref = original_qwen_quantize(x, 4, qmax, qmin)
    for a, b, c in zip(q4, q8, ref):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert int(q4[0].max()) == 15  # the chunk maximum lands on qmax (truncation of exactly 15.0)


def test_chunk_mode_scale_is_per_head_over_whole_chunk():
    x = torch.randn(2, 2, 6, 4)
    _, s, z = quantize_cache_v(x, 8, torch.tensor(255.0), torch.tensor(0.0), granularity="chunk")
    for b in range(2):
        for h in range(2):
            assert torch.all(s[b, h] == s[b, h, 0])
            expected = (x[b, h].max() - x[b, h].min()) / 255
            assert torch.allclose(s[b, h, 0, 0], expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_token_round_trip_within_half_step(dtype, bits):
    torch.manual_seed(1)
    x = (torch.randn(3, 4, 11, 32) * torch.rand(3, 4, 11, 1) * 10).to(dtype)
    x[0, 0, 0] = x[0, 0, 0].abs() + 1.0  # a row that does not straddle zero
    qmax = 2**bits - 1
    q, s, z = quantize_cache_v(x, bits, torch.tensor(qmax), torch.tensor(0))
    assert q.dtype == torch.uint8
    assert q.shape == (3, 4, 11, 32 if bits == 8 else 16)
    assert s.shape == z.shape == (3, 4, 11, 1) and s.dtype == z.dtype == dtype
    assert torch.all(s > 0) and torch.all(torch.isfinite(s))
    if bits == 8:  # integer zero point on the grid; 4-bit keeps the fractional zero of the plain min/max grid
        assert torch.all(z == torch.round(z)) and z.min() >= 0 and z.max() <= qmax
    assert torch.all(torch.isfinite(z))
    deq = dequantize_cache_torch(q, s, z, bits=bits)
    assert deq.dtype == dtype and deq.shape == x.shape
    err = (x.float() - deq.float()).abs()
    amax = x.float().abs().amax(-1, keepdim=True)
    bound = s.float() / 2 + amax * _tol(dtype) + 1e-30
    assert torch.all(err <= bound), float((err - bound).max())


@pytest.mark.parametrize("bits", (8, 4))
def test_token_mode_uses_every_level_and_rounds_to_nearest(bits):
    qmax = 2**bits - 1
    row = torch.linspace(-1.0, 2.0, 64, dtype=torch.float32).view(1, 1, 1, 64)
    q, s, z = quantize_cache_v(row, bits, qmax, 0)
    qu = unpack_int4(q) if bits == 4 else q
    assert int(qu.min()) == 0 and int(qu.max()) == qmax
    expected_scale = 3.0 / qmax
    assert abs(float(s) - expected_scale) < 1e-6
    manual = torch.clamp(torch.round(row / s + z), 0, qmax).to(torch.uint8)
    assert torch.equal(qu, manual)


def test_token_scales_are_per_position():
    x = torch.randn(1, 1, 3, 8)
    x[0, 0, 1] *= 100
    _, s, _ = quantize_cache_v(x, 8, 255, 0)
    assert s[0, 0, 1, 0] > 50 * s[0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_constant_rows_and_zeros_are_exact(dtype, bits):
    values = [0.0, 1.0, -2.5, 3.140625, -1e-3, 6e4 if dtype != torch.float16 else 6e3]
    x = torch.tensor(values, dtype=dtype).view(1, 1, len(values), 1).expand(2, 3, len(values), 8).contiguous()
    q, s, z = quantize_cache_v(x, bits, 2**bits - 1, 0)
    assert torch.all(s > 0) and torch.all(torch.isfinite(s)) and torch.all(torch.isfinite(z))
    deq = dequantize_cache_torch(q, s, z, bits=bits)
    assert torch.equal(deq, x)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf")))
@pytest.mark.parametrize("granularity", ("token", "chunk"))
def test_non_finite_inputs_raise(bad, granularity):
    x = torch.randn(1, 2, 3, 4)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_cache_v(x, 8, torch.tensor(255.0), torch.tensor(0.0), granularity=granularity)


def test_bad_arguments_raise():
    x = torch.randn(1, 1, 2, 6)
    with pytest.raises(ValueError, match="even head_dim"):
        quantize_cache_v(torch.randn(1, 1, 2, 5), 4, 15, 0)
    with pytest.raises(ValueError, match="bits"):
        quantize_cache_v(x, 3, 7, 0)
    with pytest.raises(ValueError, match="qmin/qmax"):
        quantize_cache_v(x, 4, 255, 0)
    with pytest.raises(ValueError, match="granularity"):
        quantize_cache_v(x, 8, 255, 0, granularity="channel")
    with pytest.raises(ValueError, match="4-D"):
        quantize_cache_v(torch.randn(2, 6), 8, 255, 0)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        quantize_cache_v(torch.ones(1, 1, 2, 6, dtype=torch.int32), 8, 255, 0)


def test_pack_layout_low_nibble_first():
    vals = torch.tensor([[1, 2, 15, 0, 7, 9]], dtype=torch.uint8)
    packed = pack_int4(vals)
    assert packed.tolist() == [[1 | (2 << 4), 15 | (0 << 4), 7 | (9 << 4)]]
    assert torch.equal(unpack_int4(packed), vals)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(1, 3, dtype=torch.uint8))


def test_dequantize_is_scale_times_q_minus_zero():
    q = torch.randint(0, 256, (2, 2, 3, 4), dtype=torch.uint8)
    s = torch.rand(2, 2, 3, 1, dtype=torch.float16)
    z = torch.randint(0, 256, (2, 2, 3, 1)).to(torch.float16)
    out = dequantize_cache_torch(q, s, z)
    assert out.dtype == torch.float16
    assert torch.equal(out, s * (q.to(torch.float16) - z))
    with pytest.raises(ValueError, match="bits"):
        dequantize_cache_torch(q, s, z, bits=2)


def test_4bit_grid_spans_the_row_not_zero():
    """A 4-bit row in [2, 10] uses the 16 levels on [2, 10] (step 8/15), not on [0, 10] (step 10/15)."""
    row = torch.linspace(2.0, 10.0, 64, dtype=torch.float32).view(1, 1, 1, 64)
    q, s, z = quantize_cache_v(row, 4, 15, 0)
    assert abs(float(s) - 8.0 / 15) < 1e-6
    err = (dequantize_cache_torch(q, s, z, bits=4) - row).abs().max()
    assert float(err) <= 4.0 / 15 + 1e-5
