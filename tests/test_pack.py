"""GPTQ on-disk format: round trips, and an independent decoder of the public layout written out here."""
import pytest
import torch

from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.pack import (dequantize_weight, pack_layer, pack_rows, quantize_config, unpack_layer,
                           unpack_rows)


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF


def decode_packed_column(words: list[int], bits: int, count: int) -> list[int]:
    """Decode `count` values from the int32 words of one column, following the AutoGPTQ packing loops:
    2/4/8 bits: 32 // bits values per word, lowest bits first; 3 bits: per 3 words, values 0-9 in word 0 at
    3*j, value 10 split (2 low bits at 30-31 of word 0, high bit at bit 0 of word 1), values 11-20 at 3*j+1 of
    word 1, value 21 split (low bit at 31 of word 1, high 2 bits at 0-1 of word 2), values 22-31 at 3*j+2."""
    words = [_u32(w) for w in words]
    mask = (1 << bits) - 1
    out = []
    if bits in (2, 4, 8):
        per_word = 32 // bits
        for i in range(count):
            out.append((words[i // per_word] >> (bits * (i % per_word))) & mask)
        return out
    assert bits == 3
    for base in range(0, len(words), 3):
        w0, w1, w2 = words[base], words[base + 1], words[base + 2]
        vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        vals += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        vals += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
        out += vals
    return out[:count]


def decode_layer(packed, bits, in_features, out_features, v1):
    """Float weight [out, in] from checkpoint tensors using only decode_packed_column."""
    qweight, qzeros, scales, g_idx = (packed[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    W = torch.empty(out_features, in_features, dtype=torch.float64)
    zero_rows = [decode_packed_column(qzeros[g].tolist(), bits, out_features) for g in range(qzeros.shape[0])]
    for o in range(out_features):
        codes = decode_packed_column(qweight[:, o].tolist(), bits, in_features)
        for i in range(in_features):
            g = int(g_idx[i])
            zero = zero_rows[g][o] + (1 if v1 else 0)
            W[o, i] = float(scales[g, o]) * (codes[i] - zero)
    return W


def random_layer(out_features, in_features, bits, group_size, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    maxq = 2 ** bits - 1
    n_groups = -(-in_features // group_size)
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=g)
    if sym:
        zeros = torch.full((n_groups, out_features), (maxq + 1) // 2)
    else:
        zeros = torch.randint(0, maxq + 1, (n_groups, out_features), generator=g)
    scales = torch.rand(n_groups, out_features, generator=g) + 0.01
    g_idx = torch.arange(in_features) // group_size
    return codes, scales, zeros, g_idx[torch.randperm(in_features, generator=g)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((64, 128), 32), ((40, 96), 40), ((7, 33), 16)])
def test_round_trip(bits, shape, group_size):
    out_features, in_features = shape
    for sym, fmt in ((True, "gptq"), (False, "gptq_v2")):
        codes, scales, zeros, g_idx = random_layer(out_features, in_features, bits, group_size, sym)
        packed = pack_layer(codes, scales, zeros, g_idx, bits, fmt)
        assert packed["qweight"].dtype == torch.int32 and packed["qzeros"].dtype == torch.int32
        assert packed["qweight"].shape == (-(-in_features // 32) * bits, out_features)
        assert packed["qzeros"].shape == (scales.shape[0], -(-out_features // 32) * bits)
        assert packed["scales"].dtype == torch.float16
        got_codes, got_zeros = unpack_layer(packed["qweight"], packed["qzeros"], packed["scales"],
                                            packed["g_idx"], bits, fmt)
        assert torch.equal(got_codes, codes.to(torch.int32))
        assert torch.equal(got_zeros, zeros.to(torch.int32))
        W = dequantize_weight(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, fmt,
                              dtype=torch.float32)
        expected = decode_layer(packed, bits, in_features, out_features, v1=fmt == "gptq")
        assert torch.allclose(W.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_public_layout_of_known_words(bits):
    """All-ones codes: every value field set, so each word must be fully set (except the unused top bits)."""
    ones = torch.full((64, 2), 2 ** bits - 1)
    words = pack_rows(ones, bits)
    assert words.shape == (2 * bits, 2)
    assert all(_u32(w) == 0xFFFFFFFF for w in words.flatten().tolist())
    seq = torch.arange(32).remainder(2 ** bits).view(32, 1)
    assert decode_packed_column(pack_rows(seq, bits)[:, 0].tolist(), bits, 32) == seq.flatten().tolist()
    assert torch.equal(unpack_rows(pack_rows(seq, bits), bits, 32), seq.to(torch.int32))


def test_v1_stores_zero_minus_one():
    codes = torch.zeros(8, 32, dtype=torch.int64)
    packed = pack_layer(codes, torch.ones(1, 8), torch.full((1, 8), 8), torch.zeros(32, dtype=torch.int32), 4)
    assert _u32(int(packed["qzeros"][0, 0])) == 0x77777777
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_layer(codes, torch.ones(1, 8), torch.zeros(1, 8), torch.zeros(32, dtype=torch.int32), 4, "gptq")


def test_solver_result_survives_packing():
    torch.manual_seed(0)
    n, out, bits, gs = 80, 24, 4, 32  # partial last group
    H, _ = accumulate_hessian(None, 0, torch.randn(200, n))
    res = gptq_quantize(torch.randn(out, n), H, bits, gs, desc_act=True)
    packed = pack_layer(res.codes, res.scales, res.zeros, res.g_idx, bits, "gptq")
    W = dequantize_weight(**packed, bits=bits, checkpoint_format="gptq", dtype=torch.float32)
    assert torch.allclose(W, res.weight, atol=1e-6)


def test_bad_input_rejected():
    codes = torch.zeros(4, 32, dtype=torch.int64)
    g_idx = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(ValueError, match="codes must be in"):
        pack_layer(codes + 16, torch.ones(1, 4), torch.full((1, 4), 8), g_idx, 4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_layer(codes, torch.ones(1, 4), torch.full((1, 4), 8), g_idx, 4, "awq")
    with pytest.raises(ValueError, match="g_idx"):
        pack_layer(codes, torch.ones(1, 4), torch.full((1, 4), 8), g_idx + 1, 4)
    with pytest.raises(ValueError, match="float16"):
        pack_layer(codes, torch.full((1, 4), 1e6), torch.full((1, 4), 8), g_idx, 4)
    with pytest.raises(ValueError, match="qweight shape"):
        unpack_layer(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32),
                     torch.ones(1, 4), g_idx, 4)


def test_quantize_config_keys():
    cfg = quantize_config(4, 128, 0.01, False, False, True)
    assert cfg == {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                   "sym": True, "true_sequential": True, "model_name_or_path": None,
                   "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert quantize_config(4, 128, 0.01, False, False, False)["checkpoint_format"] == "gptq_v2"
