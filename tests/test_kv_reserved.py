"""Caches grown in place into reserved capacity (kvcache/reserved.py): same states as torch.cat growth, no copy per
step within the reservation, exact growth without one, and generate() reserving its whole length."""
import pytest
import torch
from transformers import DynamicCache

from kvcache.quantized_cache import QuantizedKVCache, cache_nbytes
from kvcache.reserved import ReservedCache, append
from qwen_model.modeling_qwen import QWenLMHeadModel


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def steps(batch=2, heads=3, dim=8, lengths=(5, 1, 1, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g))
            for n in lengths]


def test_append_writes_in_place_within_capacity_and_grows_exactly_past_it():
    parts = [torch.randn(2, 3, n, 4) for n in (3, 1, 2)]
    buffer, view = append(None, None, parts[0], -2, capacity=6)
    assert buffer.shape[-2] == 6 and view.shape[-2] == 3
    first = buffer.data_ptr()
    buffer, view = append(buffer, view, parts[1], -2, capacity=6)
    buffer, view = append(buffer, view, parts[2], -2, capacity=6)
    assert buffer.data_ptr() == first
    assert torch.equal(view, torch.cat(parts, dim=-2))
    buffer, view = append(buffer, view, parts[0], -2, capacity=6)  # past the reservation: exactly what is needed
    assert buffer.data_ptr() != first and buffer.shape[-2] == view.shape[-2] == 9
    assert torch.equal(view, torch.cat(parts + parts[:1], dim=-2))


def test_append_copies_a_tensor_that_is_not_a_view_of_the_buffer():
    buffer, view = append(None, None, torch.ones(1, 4), -1, capacity=8)
    other = torch.full((1, 4), 2.0)  # e.g. what reorder_cache leaves
    buffer, view = append(buffer, other, torch.zeros(1, 2), -1, capacity=8)
    assert torch.equal(view, torch.tensor([[2.0, 2, 2, 2, 0, 0]]))


@pytest.mark.parametrize("case", ["in place", "replaced", "narrowed heads", "full", "other dtype", "empty"])
def test_append_in_place_kernel_matches_the_python_path(monkeypatch, kernel_calls, case):
    """On CPU `append` takes the kernels' `append_in_place` for its in-place case: the same buffer and view as the
    tensor ops (with the kernels unavailable), in place exactly when those write in place."""
    import kvcache.cpu_kernels as cpu_kernels

    def run():
        g = torch.Generator().manual_seed(0)
        buffer, view = append(None, None, torch.randn(2, 3, 4, 8, generator=g), -2, capacity=6)
        new = torch.randn(2, 3, 1 if case != "full" else 3, 8, generator=g)
        if case == "replaced":
            view = view.clone()
        elif case == "narrowed heads":
            view, new = view[:, :2], new[:, :2]
        elif case == "other dtype":
            new = new.double()
        elif case == "empty":
            view = view[..., :0, :]
        grown, out = append(buffer, view, new, -2, capacity=6)
        return buffer, grown, out

    with kernel_calls(cpu_kernels.load_cpu_kernels) as calls:
        buffer, grown, got = run()
    in_place = grown is buffer
    assert in_place == (case == "in place") and calls == ["append_in_place"]
    monkeypatch.setitem(cpu_kernels._state, False, None)
    plain_buffer, grown_plain, want = run()
    assert torch.equal(got, want) and got.dtype == want.dtype
    assert (grown_plain.data_ptr() == plain_buffer.data_ptr()) == in_place


def test_reserved_float_cache_matches_dynamic_cache():
    reserved, dynamic = ReservedCache(capacity=16), DynamicCache()
    for k, v in steps():
        got = reserved.update(k, v, 0)
        want = dynamic.update(k, v, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 11
    assert cache_nbytes(reserved) == 2 * 2 * 3 * 16 * 8 * 4  # the whole reservation, K and V
    reserved.crop(-4)
    dynamic.crop(-4)
    k, v = steps(lengths=(2,), seed=1)[0]
    assert all(torch.equal(a, b) for a, b in zip(reserved.update(k, v, 0), dynamic.update(k, v, 0)))
    reserved.reorder_cache(torch.tensor([1, 0]))
    dynamic.reorder_cache(torch.tensor([1, 0]))
    k, v = steps(lengths=(1,), seed=2)[0]
    assert all(torch.equal(a, b) for a, b in zip(reserved.update(k, v, 0), dynamic.update(k, v, 0)))


def flat(states):
    out = []
    for item in states:
        out.extend(flat(item) if isinstance(item, tuple) else [item])
    return out


def test_beam_reorder_stays_in_the_reserved_buffers():
    """reorder_cache (beam search) gives DynamicCache's states and keeps them prefix views of the buffers, so the next
    append is in place; with no room left it is DynamicCache's reorder."""
    reserved, dynamic = ReservedCache(capacity=10), DynamicCache()
    beams = torch.tensor([1, 1, 0])
    for k, v in steps(batch=3, lengths=(4, 1)):
        reserved.update(k, v, 0)
        dynamic.update(k, v, 0)
    buffer = reserved.layers[0]._buffers["keys"]
    reserved.reorder_cache(beams)
    dynamic.reorder_cache(beams)
    layer = reserved.layers[0]
    assert layer.keys.data_ptr() == buffer.data_ptr() and layer.room(5) is not None
    assert torch.equal(layer.keys, dynamic.layers[0].keys) and torch.equal(layer.values, dynamic.layers[0].values)
    k, v = steps(batch=3, lengths=(1,), seed=1)[0]
    assert torch.equal(reserved.update(k, v, 0)[0], dynamic.update(k, v, 0)[0])
    assert reserved.layers[0]._buffers["keys"].data_ptr() == buffer.data_ptr()
    full = ReservedCache(capacity=2)
    for k, v in steps(batch=3, lengths=(2,)):
        full.update(k, v, 0)
    full.reorder_cache(beams)  # no slot left: a new tensor, as DynamicCache's
    assert full.layers[0].keys.data_ptr() != full.layers[0]._buffers["keys"].data_ptr()


def test_int8_beam_reorder_stays_in_the_reserved_buffers():
    """The int8 token-layout cache reorders in its reserved buffers too: the states equal an unreserved cache's after
    the same reorder, stay prefix views, and the next update is written in place."""
    reserved, plain = QuantizedKVCache(bits=8, capacity=12), QuantizedKVCache(bits=8)
    beams = torch.tensor([2, 0, 0])
    for k, v in steps(batch=3, lengths=(5, 1)):
        reserved.update(k, v, 0)
        plain.update(k, v, 0)
    layer = reserved.layers[0]
    buffers = {name: layer._buffers[name].data_ptr() for name in layer._names}
    reserved.reorder_cache(beams)
    plain.reorder_cache(beams)
    for name in layer._names:
        assert getattr(layer, name).data_ptr() == buffers[name]
        assert torch.equal(getattr(layer, name), getattr(plain.layers[0], name))
    k, v = steps(batch=3, lengths=(1,), seed=2)[0]
    reserved.update(k, v, 0)
    plain.update(k, v, 0)
    assert layer.q_value.data_ptr() == buffers["q_value"] and torch.equal(layer.q_value, plain.layers[0].q_value)


def test_reserved_layer_decode_appends_in_place_and_falls_back_when_anything_changed():
    """The decode fast path writes after the filled positions without reallocating; states the caller replaced, or
    new states of another shape or dtype, or a full reservation take the general path, still as torch.cat would."""
    cache = ReservedCache(capacity=8)
    (k0, v0), (k1, v1), (k2, v2) = steps(lengths=(5, 1, 1))
    cache.update(k0, v0, 0)
    buffer = cache.layers[0]._buffers["keys"].data_ptr()
    keys, values = cache.update(k1, v1, 0)
    assert keys.data_ptr() == buffer and torch.equal(values, torch.cat([v0, v1], -2))
    layer = cache.layers[0]
    layer.keys = layer.keys.clone()  # replaced by the caller: copied into the buffer, not ignored
    layer.keys[..., 0, :] = 7.0
    keys, _ = cache.update(k2, v2, 0)
    assert torch.equal(keys[..., 0, :], torch.full_like(k2[..., 0, :], 7.0)) and keys.shape[-2] == 7
    with pytest.raises(RuntimeError):  # another head count cannot be appended to these states
        cache.update(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), 0)
    full = cache.layers[0]._buffers["keys"]  # held, so that the grown buffer cannot reuse its memory
    keys, values = cache.update(*steps(lengths=(2,), seed=4)[0], 0)  # past the 8 reserved: grows exactly
    assert keys.shape[-2] == 9 and keys.data_ptr() != full.data_ptr()
    wide = torch.zeros(2, 3, 1, 8, dtype=torch.float64)
    keys, _ = cache.update(wide, wide, 0)  # another dtype: the general path's new buffer, not a silent cast
    assert keys.dtype == torch.float64 and keys.shape[-2] == 10

@pytest.mark.parametrize("bits,layout", ((8, "token"), (4, "token"), (4, "channel_groups")))
def test_reserved_quantized_cache_matches_unreserved(bits, layout):
    reserved = QuantizedKVCache(bits=bits, key_layout=layout, capacity=160)
    plain = QuantizedKVCache(bits=bits, key_layout=layout)
    for k, v in steps(dim=8, lengths=(70, 1, 1, 60, 1)):
        got = reserved.update(k, v, 0)
        want = plain.update(k, v, 0)
    got, want = flat(got), flat(want)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert cache_nbytes(plain) < cache_nbytes(reserved)
    before = reserved.layers[0].q_value.data_ptr()
    reserved.update(*steps(lengths=(1,), seed=3)[0], 0)
    assert reserved.layers[0].q_value.data_ptr() == before  # written in place


def test_generate_reserves_its_whole_length_and_gives_the_same_tokens(tiny_dir, qwen_tokenizer):
    model = QWenLMHeadModel.from_pretrained(tiny_dir).eval()
    ids = torch.tensor([qwen_tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, ReservedCache)
    layer = cache.layers[0]
    assert layer._buffers["keys"].shape[-2] == ids.shape[1] + 6 - 1 == layer.keys.shape[-2]
    plain = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache=DynamicCache())
    assert torch.equal(out.sequences, plain)


def test_generate_reserves_the_quantized_cache_too(tiny_dir, qwen_tokenizer):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, use_cache_quantization=True).eval()
    ids = torch.tensor([qwen_tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, QuantizedKVCache)
    layer = cache.layers[0]
    assert layer._buffers["q_value"].shape[-2] == ids.shape[1] + 3 == layer.q_value.shape[-2]
    plain = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache=QuantizedKVCache())
    assert torch.equal(out.sequences, plain)
