"""The staged calibration pass (quantize.quantize_model.calibrate_block) against a plain re-run of the whole block.

calibrate_block computes each layer group's inputs from activations stored by the previous stage instead of
re-running the block; these tests hold it to what re-running QWenBlock.forward with hooks gives: the same Hessians
for every layer (with earlier groups already quantized in true-sequential mode) and the same block outputs.
"""
import copy

import pytest
import torch

from qwen_model.checkpoint import LazyCheckpoint
from qwen_model.configuration_qwen import QWenConfig
from quantize.gptq import accumulate_hessian
from quantize.quantize_model import _batches, _load_block, calibrate_block, capture_block_inputs
from quantize.quantizer import rtn_quantize

GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


def _setup(tiny_dir, n_samples=5, batch=2):
    config = QWenConfig.from_pretrained(tiny_dir)
    reader = LazyCheckpoint(tiny_dir)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, config.vocab_size, (1, 24), generator=g) for _ in range(n_samples)]
    inputs = capture_block_inputs(config, reader, _batches(samples, batch), "cpu", torch.float32)
    block_config = copy.deepcopy(config)
    block_config.use_flash_attn = True
    return block_config, reader, inputs


def _rtn(linear):
    linear.weight.data = rtn_quantize(linear.weight.data.float(), 4, 16, True).weight


def _reference(block, inputs, true_sequential):
    """Hessians by re-running the whole block with hooks on every layer (the textbook way), and the outputs."""
    hessians = {}
    for names in GROUPS if true_sequential else (sum(GROUPS, ()),):
        acc = {}
        handles = [block.get_submodule(name).register_forward_pre_hook(
            lambda m, inp, name=name: acc.__setitem__(name, accumulate_hessian(*acc.get(name, (None, 0)), inp[0])))
            for name in names]
        with torch.no_grad():
            for args, kwargs in inputs:
                block(*args, **kwargs)
        for h in handles:
            h.remove()
        hessians.update({name: acc[name][0] for name in names})
        if true_sequential:
            for name in names:
                _rtn(block.get_submodule(name))
    if not true_sequential:
        for name in hessians:
            _rtn(block.get_submodule(name))
    with torch.no_grad():
        outputs = [block(*args, **kwargs) for args, kwargs in inputs]
    return hessians, outputs


@pytest.mark.parametrize("true_sequential", [True, False])
def test_staged_pass_matches_rerunning_the_block(tiny_dir, true_sequential):
    config, reader, inputs = _setup(tiny_dir)
    ref_block = _load_block(config, reader, 1, "cpu", torch.float32)
    ref_hessians, ref_outputs = _reference(ref_block, inputs, true_sequential)

    block = _load_block(config, reader, 1, "cpu", torch.float32)
    seen, order = {}, []

    def quantize(names, hessians):
        order.append(tuple(names))
        seen.update(hessians)
        for name in names:
            _rtn(block.get_submodule(name))

    staged = [(tuple(a), dict(k)) for a, k in inputs]
    calibrate_block(block, staged, quantize, true_sequential, "cpu", torch.float32)

    assert order == (list(GROUPS) if true_sequential else [sum(GROUPS, ())])
    assert set(seen) == set(ref_hessians)
    for name, H in ref_hessians.items():
        torch.testing.assert_close(seen[name], H, rtol=1e-5, atol=1e-6, msg=name)
    for (args, _), ref in zip(staged, ref_outputs):
        torch.testing.assert_close(args[0], ref, rtol=1e-5, atol=1e-6)
    # the stage before mlp.c_proj saw quantized w1/w2 only in true-sequential mode: the Hessians must differ
    float_block = _load_block(config, reader, 1, "cpu", torch.float32)
    float_hessians, _ = _reference(float_block, inputs, False)
    differs = not torch.allclose(seen["mlp.c_proj"], float_hessians["mlp.c_proj"], rtol=1e-5, atol=1e-6)
    assert differs == true_sequential


def test_without_outputs_the_inputs_stay(tiny_dir):
    config, reader, inputs = _setup(tiny_dir, n_samples=2)
    block = _load_block(config, reader, 0, "cpu", torch.float32)
    before = [a[0].clone() for a, _ in inputs]
    calibrate_block(block, inputs, lambda names, hessians: None, True, "cpu", torch.float32, outputs=False)
    for (args, _), x in zip(inputs, before):
        assert torch.equal(args[0], x)


def test_non_finite_activation_names_the_layer(tiny_dir):
    config, reader, inputs = _setup(tiny_dir, n_samples=2)
    block = _load_block(config, reader, 0, "cpu", torch.float32)
    block.attn.c_attn.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="attn.c_proj"):
        calibrate_block(block, inputs, lambda names, hessians: None, True, "cpu", torch.float32)
