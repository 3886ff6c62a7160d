"""Peak resident memory of decoding a Qwen model at long context, with a float and with quantized KV caches.

A random Qwen-architecture model (default 8 layers, 8 heads x head_dim 64, fp32) is written to a temporary
directory. For each cache, a fresh subprocess loads it, fills the cache to ``--context`` positions through
``cache.update`` in chunks of 1024 (random keys/values of the model's shape: memory does not depend on their values,
and this skips a long prefill), then runs ``--steps`` real decode steps of the model (glibc's mmap threshold is
fixed so that resident memory follows live tensors). Linux's resident high-water
mark (VmHWM) is reset right before decoding (``/proc/self/clear_refs``), so "decode peak over resident" is what
decoding adds on top of the model and the filled cache. The torch attention reference dequantizes one layer at a time,
so that figure should stay near one layer's float K/V, far below a float copy of the whole cache.

    python benchmarks/kv_peak_memory.py                       # 16k context, 8 layers
    python benchmarks/kv_peak_memory.py --context 8192 --layers 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHES = {"float": None, "int8": (8, None), "int8-fp16": (8, torch.float16), "int4": (4, None),
          "int4-fp16": (4, torch.float16)}
FILL_CHUNK = 1024
MIB = 1 << 20
# A fixed glibc mmap threshold: every large tensor is its own mapping, returned to the OS when freed, so resident
# memory follows live tensors (the default dynamic threshold lets freed blocks up to 32 MiB be reused unseen).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Resets VmHWM to the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def write_model(out_dir: Path, layers: int, heads: int, head_dim: int, context: int) -> Path:
    from qwen_model.configuration_qwen import QWenConfig
    from qwen_model.modeling_qwen import QWenLMHeadModel

    torch.manual_seed(0)
    hidden = heads * head_dim
    config = QWenConfig(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        kv_channels=head_dim, intermediate_size=4 * hidden, seq_length=2 * context,
                        max_position_embeddings=2 * context, fp32=True, use_flash_attn=False)
    QWenLMHeadModel(config).save_pretrained(out_dir)
    return out_dir


def child(model_dir: Path, cache_name: str, context: int, steps: int) -> dict:
    """Runs in the subprocess: fill, decode, report memory figures as a dict."""
    from transformers import DynamicCache

    from kvcache.quantized_cache import QuantizedKVCache, cache_nbytes
    from qwen_model.modeling_qwen import QWenLMHeadModel

    torch.set_num_threads(1)
    spec = CACHES[cache_name]
    model = QWenLMHeadModel.from_pretrained(model_dir, use_cache_quantization=spec is not None).eval()
    cfg = model.config
    layers, heads, head_dim = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_channels
    model_resident = resident_bytes()
    cache = DynamicCache() if spec is None else QuantizedKVCache(bits=spec[0], storage_dtype=spec[1])
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for start in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - start)
            for layer in range(layers):
                k = torch.randn(1, heads, n, head_dim, generator=gen)
                v = torch.randn(1, heads, n, head_dim, generator=gen)
                cache.update(k, v, layer)
        token = torch.tensor([[1]])
        model(token, cache=cache)  # one warm-up step: first-call allocations are not part of the steady state
        before = resident_bytes()
        reset_peak()
        for _ in range(steps):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        peak = peak_bytes()
    one_layer_float = 2 * heads * cache.get_seq_length() * head_dim * 4
    return {"cache": cache_name, "model_resident": model_resident, "resident_before_decode": before,
            "decode_peak": peak, "cache_bytes": cache_nbytes(cache), "one_layer_float_kv": one_layer_float,
            "all_layers_float_kv": layers * one_layer_float, "seq": cache.get_seq_length()}


def render(rows: list[dict], args) -> str:
    out = [f"Qwen-architecture model, {args.layers} layers x {args.heads} heads x head_dim {args.head_dim}, fp32; "
           f"cache filled to {args.context} positions, then {args.steps} decode steps (torch attention, CPU). "
           f"MiB = 2^20 bytes.\n",
           "| cache | cache bytes (MiB) | resident after fill (MiB) | decode peak (MiB) | decode peak over resident "
           "(MiB) | one layer's float K/V (MiB) | whole cache as float (MiB) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['cache']} | {r['cache_bytes'] / MIB:.1f} | {r['resident_before_decode'] / MIB:.1f} | "
                   f"{r['decode_peak'] / MIB:.1f} | {(r['decode_peak'] - r['resident_before_decode']) / MIB:.1f} | "
                   f"{r['one_layer_float_kv'] / MIB:.1f} | {r['all_layers_float_kv'] / MIB:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated subset of {', '.join(CACHES)}")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.context, args.steps)))
        return 0
    caches = args.caches.split(",")
    unknown = [c for c in caches if c not in CACHES]
    if unknown:
        parser.error(f"unknown caches {unknown}; choose from {', '.join(CACHES)}")
    if args.context < 1 or args.steps < 1:
        parser.error("--context and --steps must be positive")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model", args.layers, args.heads, args.head_dim, args.context)
        for name in caches:
            result = subprocess.run([sys.executable, __file__, "--child", str(model_dir), name, "--context",
                                     str(args.context), "--steps", str(args.steps)],
                                    capture_output=True, text=True, check=True, env=CHILD_ENV)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(render(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
