"""Perplexity and bytes of our quantized KV caches vs transformers' QuantizedCache (the peer), on SmolLM2-135M.

Protocol of ../shared/data/PEER_RESULTS.md, "KV-cache quantization": ``wiki.test.raw`` tokenized once with the
model's tokenizer.json, the first 4 windows of 1024 tokens, each fed through a fresh cache in chunks of 128
(``quantize.evaluate.chunked_perplexity``: every prediction scored, NLL summed in float64). Bytes: every tensor the
cache holds after the last 1024-token window, as a ratio to a 16-bit cache of the same model (ours keeps 9 KV heads,
as the converter repeats SmolLM2's 3 into 9; the peer's Llama keeps 3, so only ratios compare).

Rows:
* ours-*: ``QWenLMHeadModel`` with ``QuantizedKVCache`` (token granularity; fp16 = ``storage_dtype=float16``; chunk =
  the original Qwen arithmetic). int4 rows use the default 4-bit key layout (pre-RoPE keys per channel over groups of
  64 positions); int4-token = the earlier layout (post-RoPE keys, one scale and zero per token). A chunk attends to its own keys/values in full precision and to earlier chunks
  through the quantized cache; the chunk rows keep the original all-quantized arithmetic.
* peer-*: the same weights as ``LlamaForCausalLM`` (c_attn split, the repeated KV heads folded back to 3) with
  ``DynamicCache`` and ``QuantizedCache`` (quanto int4 / hqq int8, q_group_size 64, residual 128). The peer's cache
  returns a chunk's own keys/values in float; only earlier chunks are read back quantized.
* native-*: our ``QuantizedKVCache`` in that same ``LlamaForCausalLM`` (transformers' own class, 3 KV heads), through
  ``kvcache.native_attention``; native-int4 is the default 4-bit layout (the keys the model rotated are rotated
  back before the cache, then grouped per channel as in ours-int4), native-int4-token the post-RoPE per-token one.
  A chunk attends to its own keys/values in full precision, as in ours-* and peer-*.
* sim-*: what-if rows on our float model: a DynamicCache holding quantize-then-dequantize keys/values (the same
  numbers the quantized model attends to, see tests/test_kv_model.py), with the current chunk kept in float as the
  peer does ("own-float"), and optionally keys grouped per channel over each chunk (KIVI). Bytes are not measured.

    PYTHONPATH=/tmp/peer_site python benchmarks/kv_quality.py --model /work/smollm2   # all rows, ~30 min on 2 cores
    python benchmarks/kv_quality.py --model DIR --rows ours-float,ours-int8-fp16 --windows 1

The peer rows need ``pip install optimum-quanto==0.2.7 hqq==0.2.8.post1`` (hqq may be installed into a separate
``--target`` directory put on PYTHONPATH: importing it slows every transformers import by seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calib_data.tokenization import encode_text  # noqa: E402
from kvcache.quantized_cache import QuantizedKVCache  # noqa: E402
from quantize.evaluate import chunked_perplexity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CTX, CHUNK, WINDOWS = 1024, 128, 4
PEER_PUBLISHED = {"peer-float": 23.237, "peer-quanto-int4": 23.417, "peer-hqq-int8": 23.290}
ROWS = ("peer-float", "peer-quanto-int4", "peer-hqq-int8", "ours-int8-fp16", "ours-int4-fp16", "ours-int4-token-fp16",
        "ours-int8", "ours-int4",
        "native-float", "native-int8-fp16", "native-int4-fp16", "native-int4-token-fp16", "native-int8", "native-int4",
        "native-int4-token",
        "ours-float", "sim-int4-own-float", "sim-int4-kivi-own-float", "sim-int4-minmax", "sim-int4-minmax-own-float",
        "sim-int4-kivi-minmax-own-float", "sim-int4-g32-own-float", "sim-int4-g32-minmax-own-float", "ours-chunk-int8")
PERPLEXITY_FREE = ("ours-int8", "ours-int4", "native-int8", "native-int4", "native-int4-token")  # same numbers as the -fp16 rows up to fp16 rounding: bytes only


def tensor_bytes(obj, seen: set) -> int:
    """Bytes of the distinct storages reachable from ``obj`` (tensors, tensor subclasses, dicts, lists, objects)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(
                obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name), seen) for name in names)
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), obj.device)
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k != "quantizer")
    return 0


def cache_bytes(cache) -> int:
    seen: set = set()
    return sum(tensor_bytes(layer, seen) for layer in cache.layers)


def load_ids(model_dir: Path, data: Path) -> list[int]:
    from qwen_model import load_tokenizer

    return encode_text(load_tokenizer(str(model_dir)), data.read_text(encoding="utf-8"))


def llama_from_qwen(model_dir: Path):
    """The Qwen-layout SmolLM2 checkpoint as a Hugging Face LlamaForCausalLM with its 3 original KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, head_dim = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    state = load_file(model_dir / "model.safetensors")
    c_attn_0 = state["transformer.h.0.attn.c_attn.weight"]
    k_heads = c_attn_0[hidden:2 * hidden].reshape(heads, head_dim, hidden)
    group = max(g for g in range(1, heads + 1) if heads % g == 0 and all(
        torch.equal(k_heads[i], k_heads[i - i % g]) for i in range(heads)))
    kv_heads = heads // group
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=cfg["layer_norm_epsilon"], rope_theta=cfg["rotary_emb_base"],
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, dtype=torch.float32,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": float(cfg["rotary_emb_base"])}
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"], "model.norm.weight":
           state["transformer.ln_f.weight"], "lm_head.weight": state["lm_head.weight"]}

    def fold(w):  # [heads*d, ...] -> [kv_heads*d, ...], every group's repeated copies being identical
        w = w.reshape(kv_heads, group, head_dim, *w.shape[1:])
        if not all(torch.equal(w[:, 0], w[:, j]) for j in range(group)):
            raise ValueError("KV heads are not repeated copies; cannot fold them back")
        return w[:, 0].reshape(kv_heads * head_dim, *w.shape[3:])

    for i in range(cfg["num_hidden_layers"]):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"]
        if b.abs().max() != 0:
            raise ValueError("c_attn has a non-zero bias; the Llama layout has none")
        out[q + "self_attn.q_proj.weight"] = w[:hidden]
        out[q + "self_attn.k_proj.weight"] = fold(w[hidden:2 * hidden])
        out[q + "self_attn.v_proj.weight"] = fold(w[2 * hidden:])
        out[q + "self_attn.o_proj.weight"] = state[p + "attn.c_proj.weight"]
        out[q + "mlp.gate_proj.weight"] = state[p + "mlp.w2.weight"]
        out[q + "mlp.up_proj.weight"] = state[p + "mlp.w1.weight"]
        out[q + "mlp.down_proj.weight"] = state[p + "mlp.c_proj.weight"]
        out[q + "input_layernorm.weight"] = state[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = state[p + "ln_2.weight"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(out, strict=True)
    return model.eval()


def fake_quantize(x: torch.Tensor, bits: int, dim: int, minmax: bool = False) -> torch.Tensor:
    """Asymmetric quantize-then-dequantize along ``dim``.

    Default: our token quantizer's rule (range widened to include 0, integer zero point). ``minmax``: the range is
    exactly [min, max] with a float offset (as quanto's affine quantizer), so both extremes are representable."""
    qmax = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    if minmax:
        scale = ((hi - lo) / qmax).clamp(min=torch.finfo(x.dtype).tiny)
        return torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(x.dtype).tiny)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale + zero), 0, qmax) - zero) * scale


class SimulatedCache(DynamicCache):
    """Float cache of quantize-dequantize K/V (see ``fake_quantize``).

    ``key_dim=-1`` groups keys per token over head_dim (our layout); ``key_dim=-2`` per channel over the chunk
    (KIVI). Values are always per token. ``group``: groups of that many channels along head_dim instead of whole
    rows (keys and values, per token). ``own_float``: the current chunk attends to its own K/V unrounded (as the
    peer's cache does); otherwise to its quantized copy (as our model does)."""

    def __init__(self, bits: int, key_dim: int, own_float: bool = True, minmax: bool = False, group: int = 0):
        super().__init__()
        self.bits, self.key_dim, self.own_float, self.minmax, self.group = bits, key_dim, own_float, minmax, group

    def _quantize(self, x, dim):
        if not self.group:
            return fake_quantize(x, self.bits, dim, self.minmax)
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // self.group, self.group)
        return fake_quantize(grouped, self.bits, -1, self.minmax).reshape(x.shape)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[-2]
        keys, values = super().update(self._quantize(key_states, self.key_dim), self._quantize(value_states, -1),
                                      layer_idx)
        if not self.own_float:
            return keys, values
        return (torch.cat([keys[..., :-n, :], key_states], dim=-2),
                torch.cat([values[..., :-n, :], value_states], dim=-2))


def make_row(name: str, model_dir: Path, models: dict):
    """(model, make_cache, kv_heads) for one row; models are built once and shared."""
    def qwen():
        if "qwen" not in models:
            from qwen_model.modeling_qwen import QWenLMHeadModel

            models["qwen"] = QWenLMHeadModel.from_pretrained(model_dir).eval()
        return models["qwen"], models["qwen"].config.num_attention_heads

    def llama():
        if "llama" not in models:
            models["llama"] = llama_from_qwen(model_dir)
        return models["llama"], models["llama"].config.num_key_value_heads

    if name.startswith("peer-"):
        from transformers import QuantizedCache

        model, kv_heads = llama()
        makers = {
            "peer-float": DynamicCache,
            "peer-quanto-int4": lambda: QuantizedCache("quanto", model.config, nbits=4, q_group_size=64,
                                                       residual_length=128),
            "peer-hqq-int8": lambda: QuantizedCache("hqq", model.config, nbits=8, q_group_size=64,
                                                    residual_length=128),
        }
        return model, makers[name], kv_heads
    if name.startswith("native-"):
        from kvcache.native_attention import use_quantized_kv_attention

        if "native" not in models:
            models["native"] = llama_from_qwen(model_dir)
            use_quantized_kv_attention(models["native"])
        model = models["native"]
        makers = {
            "native-float": DynamicCache,
            "native-int8": lambda: QuantizedKVCache(bits=8),
            "native-int8-fp16": lambda: QuantizedKVCache(bits=8, storage_dtype=torch.float16),
            "native-int4": lambda: QuantizedKVCache(bits=4),
            "native-int4-fp16": lambda: QuantizedKVCache(bits=4, storage_dtype=torch.float16),
            "native-int4-token": lambda: QuantizedKVCache(bits=4, key_layout="token"),
            "native-int4-token-fp16": lambda: QuantizedKVCache(bits=4, storage_dtype=torch.float16,
                                                               key_layout="token"),
        }
        return model, makers[name], model.config.num_key_value_heads
    model, kv_heads = qwen()
    makers = {
        "ours-float": DynamicCache,
        "ours-int8": lambda: QuantizedKVCache(bits=8),
        "ours-int8-fp16": lambda: QuantizedKVCache(bits=8, storage_dtype=torch.float16),
        "ours-int4": lambda: QuantizedKVCache(bits=4),
        "ours-int4-fp16": lambda: QuantizedKVCache(bits=4, storage_dtype=torch.float16),
        "ours-int4-token-fp16": lambda: QuantizedKVCache(bits=4, storage_dtype=torch.float16, key_layout="token"),
        "ours-chunk-int8": lambda: QuantizedKVCache(bits=8, granularity="chunk"),
        "sim-int4-own-float": lambda: SimulatedCache(4, key_dim=-1),
        "sim-int4-kivi-own-float": lambda: SimulatedCache(4, key_dim=-2),
        "sim-int4-minmax": lambda: SimulatedCache(4, key_dim=-1, own_float=False, minmax=True),
        "sim-int4-minmax-own-float": lambda: SimulatedCache(4, key_dim=-1, minmax=True),
        "sim-int4-kivi-minmax-own-float": lambda: SimulatedCache(4, key_dim=-2, minmax=True),
        "sim-int4-g32-own-float": lambda: SimulatedCache(4, key_dim=-1, group=32),
        "sim-int4-g32-minmax-own-float": lambda: SimulatedCache(4, key_dim=-1, minmax=True, group=32),
    }
    return model, makers[name], kv_heads


class KeepLast:
    """Wraps a cache factory and remembers the last cache it made (to count its bytes after the run)."""

    def __init__(self, factory):
        self.factory, self.last = factory, None

    def __call__(self):
        self.last = self.factory()
        return self.last


def fill_one_window(model, make_cache, ids):
    """Bytes of a cache after one CTX-token window fed in CHUNK-token chunks (for rows scored elsewhere)."""
    cache = make_cache()
    with torch.inference_mode():
        for start in range(0, CTX, CHUNK):
            model(torch.tensor([ids[start:start + CHUNK]]), cache=cache, use_cache=True)
    return cache


def run_row(name, model_dir, models, ids, windows):
    model, factory, kv_heads = make_row(name, model_dir, models)
    n_layers, head_dim = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    sixteen_bit = n_layers * 2 * kv_heads * CTX * head_dim * 2
    if name in PERPLEXITY_FREE:
        return {"row": name, "ppl": None, "seconds": None, "ratio": cache_bytes(
            fill_one_window(model, factory, ids)) / sixteen_bit}
    keeper = KeepLast(factory)
    start = time.perf_counter()
    ppl = chunked_perplexity(model, ids, ctx=CTX, chunk=CHUNK, n_windows=windows, make_cache=keeper, progress=False)
    seconds = time.perf_counter() - start
    ratio = None if name.startswith("sim-") else cache_bytes(keeper.last) / sixteen_bit
    return {"row": name, "ppl": ppl, "seconds": seconds, "ratio": ratio}


def render(results: list[dict]) -> str:
    by = {r["row"]: r for r in results}
    lines = ["| cache | perplexity | vs float | bytes held, vs a 16-bit cache | scoring time vs float | peer published |",
             "|---|---|---|---|---|---|"]
    for r in results:
        family = r["row"].split("-")[0] if r["row"].startswith(("peer-", "native-")) else "ours"
        base = by.get(f"{family}-float") or by.get("peer-float")  # the two float rows agree (same weights)
        ppl = "–" if r["ppl"] is None else f"{r['ppl']:.3f}"
        delta = ("–" if r["ppl"] is None or base is None or r["row"] in ("ours-float", "peer-float")
                 else f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%")
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
        speed = ("–" if r["seconds"] is None or base is None or base["seconds"] is None
                 else f"{r['seconds'] / base['seconds']:.2f}")
        published = PEER_PUBLISHED.get(r["row"])
        lines.append(f"| {r['row']} | {ppl} | {delta} | {ratio} | {speed} | {published or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO.parent / "smollm2", help="Qwen-layout SmolLM2 dir")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wiki.test.raw")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    ids = load_ids(args.model, args.data)
    models: dict = {}
    results = []
    for name in rows:
        results.append(run_row(name, args.model, models, ids, args.windows))
        r = results[-1]
        print(f"{name}: ppl {r['ppl']}, ratio {r['ratio']}, {r['seconds']} s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(f"SmolLM2-135M, wiki.test.raw, first {args.windows} windows of {CTX} tokens in chunks of {CHUNK}\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
