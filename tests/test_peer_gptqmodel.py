"""Interoperability with the peer library GPTQModel (and transformers' GPTQ integration, which runs on it).

(a) Checkpoints written by our CLI load through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True,
    gptq_backend="hf")`, i.e. transformers + optimum + GPTQModel kernels, with the very same dequantized weights and
    the same logits as `QWenLMHeadModel.from_pretrained`.
(b) A checkpoint quantized BY GPTQModel (a tiny random Llama, the architecture it knows) loads in `qwen_model` after
    the Llama -> Qwen v1 re-layout of benchmarks/peer_llama_layout.py, with the same weights and logits as
    GPTQModel's own inference.

Needs gptqmodel and optimum (pip install -e ".[interop]"): skipped without them, an error under CI=true (tests/peers.py).
"""
import contextlib
import json
import logging
import os

import pytest
import torch
from peers import require

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
require("optimum")
_ROOT = logging.getLogger()
_ROOT_BEFORE, _ROOT_LEVEL = set(_ROOT.handlers), _ROOT.level
gptqmodel = require("gptqmodel")
_GPTQMODEL_HANDLERS = [h for h in _ROOT.handlers if h not in _ROOT_BEFORE]

from transformers import AutoModelForCausalLM, GPTQConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.peer_llama_layout import (  # noqa: E402
    convert_llama_gptq_to_qwen, fuse_qkv, llama_to_qwen_state, qwen_config_from_llama)
from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: E402
from qwen_model.configuration_qwen import QWenConfig  # noqa: E402
from qwen_model.modeling_qwen import QWenLMHeadModel  # noqa: E402
from quantize.quant_linear import QuantLinear  # noqa: E402

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# fp32 activations on both sides; the peer dequantizes to float16 (bit-identical to our float16 dequantization,
# checked exactly below) while ours dequantizes in float32, so logits differ by float16 weight rounding only
# (measured <= 2.2e-3 of max |logit| on the tiny model). Ours runs its plain torch kernel here: the comparison is of
# formats, and the CPU int4pack kernel computes in bfloat16 (up to ~3.6% of max |logit| on the tiny model).
LOGITS_RTOL = 5e-3
# transformers' default CPU kernel (TorchAtenLinear) runs the matmul with bfloat16 activations and scales
# (measured <= 2.9e-2 of max |logit|); a zero-point or packing error shifts whole groups by a full scale step.
LOGITS_RTOL_BF16 = 6e-2

VARIANTS = {  # name: (bits, extra CLI flags)
    "int4-gar": (4, []),
    "int4-desc-act": (4, ["--desc-act"]),
    "int4-asym-v2": (4, ["--no-sym"]),
    "int8": (8, []),
}


def _restore_root_logging():
    """Importing gptqmodel adds a stderr handler to the root logger and sets it to INFO; undo that for the rest of
    the test session."""
    for handler in _GPTQMODEL_HANDLERS:
        _ROOT.removeHandler(handler)
    _ROOT.setLevel(_ROOT_LEVEL)


_restore_root_logging()


@pytest.fixture(autouse=True)
def _root_logging_untouched():
    yield
    _restore_root_logging()



def _max_rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def our_checkpoints(tiny_dir, tmp_path_factory):
    """The tiny model quantized by our CLI in each variant (group size 32: two groups per 64-wide input)."""
    from quantize.cli import main

    root = tmp_path_factory.mktemp("ours_gptq")
    out = {}
    for name, (bits, flags) in VARIANTS.items():
        out[name] = root / name
        rc = main(bits, ["--model", str(tiny_dir), "--out", str(out[name]), "--group-size", "32", "--nsamples", "8",
                         "--seqlen", "64", "-q", *flags])
        assert rc == 0
    return out


def _load_hf(path, bits, backend=None):
    """Through transformers + optimum + GPTQModel, in float32 like our tiny model (our checkpoints record float16,
    the dtype a server should run them in, which transformers would otherwise take)."""
    kwargs = {} if backend is None else {"quantization_config": GPTQConfig(bits=bits, backend=backend)}
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, gptq_backend="hf", dtype=torch.float32,
                                                **kwargs).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_checkpoint_loads_through_transformers_gptq(our_checkpoints, variant):
    bits = VARIANTS[variant][0]
    path = our_checkpoints[variant]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    ours = QWenLMHeadModel.from_pretrained(path, gptq_kernel="torch")
    hf = _load_hf(path, bits, backend="gptq_torch")
    for i, (block_hf, block_ours) in enumerate(zip(hf.transformer.h, ours.transformer.h)):
        for name in LINEARS:
            peer, mine = block_hf.get_submodule(name), block_ours.get_submodule(name)
            assert isinstance(peer, BaseQuantLinear), f"block {i} {name}: {type(peer)} is not a GPTQModel layer"
            assert isinstance(mine, QuantLinear)
            assert peer.bits == bits and peer.group_size == config["group_size"]
            # GPTQModel's dequantization ([in, out], float16) against ours, bit for bit
            torch.testing.assert_close(peer.dequantize_weight(), mine.dequantize_weight(torch.float16).t(),
                                       rtol=0, atol=0, msg=f"block {i} {name} ({variant})")
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        ref, got = ours(ids).logits, hf(ids).logits
    assert got.dtype == ref.dtype == torch.float32
    assert _max_rel_diff(got, ref) <= LOGITS_RTOL


def test_our_checkpoint_default_transformers_kernel(our_checkpoints):
    """Without a backend choice transformers picks GPTQModel's CPU int4 kernel (bfloat16 matmul)."""
    path = our_checkpoints["int4-gar"]
    ours = QWenLMHeadModel.from_pretrained(path, gptq_kernel="torch")
    hf = _load_hf(path, 4)
    kinds = {type(hf.transformer.h[0].get_submodule(n)) for n in LINEARS}
    assert all(issubclass(k, BaseQuantLinear) for k in kinds), kinds
    ids = _ids(ours.config.vocab_size, seed=1)
    with torch.no_grad():
        ref, got = ours(ids).logits, hf(ids).logits
    assert _max_rel_diff(got, ref) <= LOGITS_RTOL_BF16
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------------------- (b) peer -> us

TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, initializer_range=0.1)


def _write_word_tokenizer(path, vocab: int) -> None:
    """A minimal fast tokenizer (GPTQModel.load insists on one); calibration is passed as token ids anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", eos_token="t1",
                            bos_token="t2").save_pretrained(path)


@pytest.fixture(scope="module")
def peer_checkpoint(tmp_path_factory):
    """(float Llama dir, GPTQModel 4-bit g32 checkpoint dir) for a seeded tiny random Llama."""
    from gptqmodel import GPTQModel, QuantizeConfig

    root = tmp_path_factory.mktemp("peer_gptq")
    torch.manual_seed(0)
    src = root / "llama"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval().save_pretrained(src)
    _write_word_tokenizer(src, TINY_LLAMA["vocab_size"])
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, TINY_LLAMA["vocab_size"], (1, 64), generator=gen),
              "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(8)]
    with contextlib.chdir(root):
        model = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False,
                                                        offload_to_disk=False), device="cpu")
        model.quantize(calib)
        model.save(str(root / "llama-gptq"))
    return src, root / "llama-gptq"


def test_llama_float_relayout_is_exact(peer_checkpoint):
    """The re-layout itself: the float Llama and the Qwen v1 model built from its tensors agree to float32 noise."""
    src, _ = peer_checkpoint
    llama = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qwen = QWenLMHeadModel(QWenConfig(**qwen_config_from_llama(llama.config.to_dict()))).eval()
    qwen.load_state_dict(llama_to_qwen_state(llama.state_dict(), TINY_LLAMA["num_hidden_layers"]), strict=True)
    ids = _ids(TINY_LLAMA["vocab_size"], seed=2)
    with torch.no_grad():
        ref, got = llama(ids).logits, qwen(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gptqmodel_checkpoint_loads_in_qwen_model(peer_checkpoint, tmp_path):
    from gptqmodel import GPTQModel

    _, quantized = peer_checkpoint
    qwen_dir = convert_llama_gptq_to_qwen(quantized, tmp_path / "qwen-gptq")
    ours = QWenLMHeadModel.from_pretrained(qwen_dir, gptq_kernel="torch")
    peer = GPTQModel.load(str(quantized), device="cpu", backend="gptq_torch", dtype=torch.float16)
    for i, (layer, block) in enumerate(zip(peer.model.model.layers, ours.transformer.h)):
        assert isinstance(block.attn.c_attn, QuantLinear)
        qkv = torch.cat([layer.self_attn.get_submodule(p).dequantize_weight() for p in ("q_proj", "k_proj", "v_proj")],
                        dim=1)
        pairs = [(qkv, block.attn.c_attn), (layer.self_attn.o_proj.dequantize_weight(), block.attn.c_proj),
                 (layer.mlp.gate_proj.dequantize_weight(), block.mlp.w2),
                 (layer.mlp.up_proj.dequantize_weight(), block.mlp.w1),
                 (layer.mlp.down_proj.dequantize_weight(), block.mlp.c_proj)]
        for want, mine in pairs:
            torch.testing.assert_close(mine.dequantize_weight(torch.float16).t(), want, rtol=0, atol=0,
                                       msg=f"layer {i}")
    ids = _ids(TINY_LLAMA["vocab_size"], seed=3)
    with torch.no_grad():
        ref = peer.model(ids).logits.float()  # GPTQModel's own float16 inference
        got = ours(ids).logits
    # float16 activations on the peer's side: measured 6e-4 of max |logit|
    assert _max_rel_diff(got, ref) <= LOGITS_RTOL


def test_relayout_rejects_what_qwen_cannot_hold():
    with pytest.raises(ValueError, match="grouped-query"):
        qwen_config_from_llama({**TINY_LLAMA, "num_key_value_heads": 2})
    part = {"qweight": torch.zeros(8, 12, dtype=torch.int32), "qzeros": torch.zeros(2, 1, dtype=torch.int32),
            "scales": torch.ones(2, 12, dtype=torch.float16), "g_idx": torch.arange(64, dtype=torch.int32) // 32}
    with pytest.raises(ValueError, match="int32 boundary"):
        fuse_qkv([part, part, part], 4, "x")
    ok = {**part, "qweight": torch.zeros(8, 16, dtype=torch.int32), "qzeros": torch.zeros(2, 2, dtype=torch.int32),
          "scales": torch.ones(2, 16, dtype=torch.float16)}
    other = {**ok, "g_idx": ok["g_idx"].flip(0)}
    with pytest.raises(ValueError, match="g_idx"):
        fuse_qkv([ok, ok, other], 4, "x")
    fused = fuse_qkv([ok, ok, ok], 4, "x")
    assert fused["qweight"].shape == (8, 48) and fused["qzeros"].shape == (2, 6) and fused["scales"].shape == (2, 48)
