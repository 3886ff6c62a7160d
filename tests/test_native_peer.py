"""Native checkpoints and the ecosystem: (a) our Qwen2 / Qwen3 / Llama GPTQ checkpoints load through
`AutoModelForCausalLM.from_pretrained` (transformers + optimum + GPTQModel, no remote code) with bit-identical
dequantized weights and the same greedy tokens as through this package; (b) GPTQModel's own checkpoint of a tiny
GQA Llama loads in this package with its exact weights and logits.

Needs gptqmodel and optimum (pip install -e ".[interop]"): skipped without them, an error under CI=true."""
import contextlib
import os

import pytest
import torch
from peers import require

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
require("optimum")
require("gptqmodel")

from test_peer_gptqmodel import _root_logging_untouched  # noqa: E402,F401  (autouse: undo gptqmodel's logging)
from transformers import AutoModelForCausalLM, GPTQConfig  # noqa: E402

from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: E402
from native_tiny import create_native_tiny  # noqa: E402
from quantize.cli import main  # noqa: E402
from quantize.model_families import get_family  # noqa: E402
from quantize.native_checkpoint import load_native_quantized  # noqa: E402
from quantize.quant_linear import QuantLinear  # noqa: E402

VARIANTS = {"int4": (4, []), "int4-desc-act": (4, ["--desc-act"]), "int4-asym-v2": (4, ["--no-sym"]), "int8": (8, [])}
CASES = [("qwen2", "int4"), ("qwen3", "int4"), ("llama", "int4"), ("qwen2", "int8"), ("qwen3", "int4-desc-act"),
         ("llama", "int4-asym-v2")]


@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_src")
    return {t: create_native_tiny(t, root / t) for t in ("qwen2", "qwen3", "llama")}


def _quantize(src, out, variant):
    bits, flags = VARIANTS[variant]
    assert main(bits, ["--model", str(src), "--out", str(out), "--group-size", "32", "--nsamples", "8",
                       "--seqlen", "64", "-q", *flags]) == 0
    return out


@pytest.mark.parametrize("model_type,variant", CASES)
def test_transformers_gptq_path_matches_ours(native_dirs, tmp_path, model_type, variant):
    out = _quantize(native_dirs[model_type], tmp_path / "q", variant)
    bits = VARIANTS[variant][0]
    ours = load_native_quantized(out, kernel="torch")
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"),
                                              dtype=torch.float32).eval()
    assert type(hf) is type(ours)
    family = get_family(model_type)
    for i, (peer_block, our_block) in enumerate(zip(hf.model.layers, ours.model.layers)):
        for name in family.linears:
            peer, mine = peer_block.get_submodule(name), our_block.get_submodule(name)
            assert isinstance(peer, BaseQuantLinear) and isinstance(mine, QuantLinear)
            torch.testing.assert_close(peer.dequantize_weight(), mine.dequantize_weight(torch.float16).t(),
                                       rtol=0, atol=0, msg=f"layer {i} {name}")
            if mine.bias is not None:
                torch.testing.assert_close(peer.bias.half(), mine.bias, rtol=0, atol=0)
    ids = torch.tensor([[1, 40, 77, 12, 200, 9], [1, 5, 90, 91, 17, 250]])
    with torch.no_grad():
        want = ours.generate(ids, max_new_tokens=10, do_sample=False)
        got = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def peer_llama(native_dirs, tmp_path_factory):
    """GPTQModel's 4-bit g32 checkpoint of the tiny GQA Llama."""
    from gptqmodel import GPTQModel, QuantizeConfig

    root = tmp_path_factory.mktemp("peer_native")
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(3, 259, (1, 64), generator=gen),
              "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(8)]
    with contextlib.chdir(root):
        model = GPTQModel.load(str(native_dirs["llama"]), QuantizeConfig(bits=4, group_size=32, sym=True,
                                                                         desc_act=False, offload_to_disk=False),
                               device="cpu")
        model.quantize(calib)
        model.save(str(root / "llama-gptq"))
    return root / "llama-gptq"


def test_gptqmodel_checkpoint_loads_in_ours(peer_llama):
    from gptqmodel import GPTQModel

    ours = load_native_quantized(peer_llama, kernel="torch")
    peer = GPTQModel.load(str(peer_llama), device="cpu", backend="gptq_torch", dtype=torch.float16)
    for i, (layer, block) in enumerate(zip(peer.model.model.layers, ours.model.layers)):
        for name in get_family("llama").linears:
            mine = block.get_submodule(name)
            assert isinstance(mine, QuantLinear)
            torch.testing.assert_close(mine.dequantize_weight(torch.float16).t(),
                                       layer.get_submodule(name).dequantize_weight(), rtol=0, atol=0,
                                       msg=f"layer {i} {name}")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = peer.model(ids).logits.float()  # GPTQModel's own float16 inference
        got = ours(ids).logits
    # float16 activations on the peer's side vs float32 here
    assert float((got - ref).abs().max() / ref.abs().max()) <= 5e-3
