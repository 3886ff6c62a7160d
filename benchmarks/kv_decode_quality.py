"""Perplexity through the decode path: windows of wiki.test.raw fed one token at a time, float vs quantized caches,
with the CPU kernels (what decoding uses) and with the plain-torch blocks (the kernels turned off), side by side.

``benchmarks/kv_quality.py`` feeds chunks of 128 tokens (the peers' protocol), which never reach the kernels: they
take one decoded token (up to ``KERNEL_QUERIES`` queries with no float ``fresh`` tail). Feeding one token at a time
scores every prediction through them. A quantized cache fed its own states amplifies float32 rounding (a difference
of ~1e-6 flips the rounding of an occasional code of a later position), so the plain-torch path also runs with
blocks of other sizes (``--plain-blocks``: the same arithmetic summed in another order), and the dequantizing
reference ``attention_torch`` runs too, to show the size of that noise next to the kernels' difference.

    python benchmarks/kv_decode_quality.py --model DIR --windows 1 --ctx 512 --plain-blocks 1024,64
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHES = {"float": None, "int8": 8, "int4": 4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Qwen v1 checkpoint directory (float)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" /
                        "wiki.test.raw")
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain-blocks", default="1024",
                        help="comma-separated block sizes (positions) of the plain-torch rows; the first is the "
                             "one the kernels are compared with (default 1024, attention_chunked's default)")
    args = parser.parse_args(argv)
    try:
        blocks = [int(b) for b in args.plain_blocks.split(",")]
    except ValueError:
        parser.error(f"--plain-blocks must be comma-separated integers, got {args.plain_blocks!r}")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a checkpoint directory (no config.json)")
    if args.windows < 1 or args.ctx < 2 or min(blocks) < 1:
        parser.error("--windows must be >= 1, --ctx >= 2 and --plain-blocks positive")

    import kvcache.chunked_attention as chunked
    import kvcache.cpu_kernels as cpu_kernels
    from benchmarks.kv_quality import load_ids
    from kvcache.quantized_attention import attention_torch
    from kvcache.quantized_cache import QuantizedKVCache
    from kvcache.reserved import ReservedCache
    from quantize.evaluate import chunked_perplexity
    from qwen_model.modeling_qwen import QWenLMHeadModel

    torch.set_num_threads(args.threads)
    if cpu_kernels.load_cpu_kernels() is None:
        print("error: the CPU kernels could not be built here", file=sys.stderr)
        return 1
    ids = load_ids(args.model, args.data)
    model = QWenLMHeadModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    kernels = cpu_kernels._state[False]
    rows = []
    blockwise = chunked.attention_chunked

    def reference(query, layer_past, attn_mask=None, scale=None, fresh=None, inv_freq=None, chunk=None):
        return attention_torch(query, layer_past, attn_mask, scale, fresh=fresh, inv_freq=inv_freq)

    for name, bits in CACHES.items():
        paths = ("kernels", *(f"plain torch, blocks of {b}" for b in blocks), "dequantize reference")
        for path in (paths if bits else ("-",)):
            cpu_kernels._state[False] = kernels if path == "kernels" else None
            # "auto" on CPU without the kernels calls kvcache.chunked_attention.attention_chunked: pick its block
            # size, or put the dequantizing reference in its place
            if path.startswith("plain"):
                chunked.attention_chunked = functools.partial(blockwise, chunk=int(path.rsplit(" ", 1)[1]))
            if path == "dequantize reference":
                chunked.attention_chunked = reference
            make = (lambda: ReservedCache(args.ctx)) if bits is None else (
                lambda bits=bits: QuantizedKVCache(bits=bits, capacity=args.ctx))
            start = time.perf_counter()
            ppl = chunked_perplexity(model, ids, ctx=args.ctx, chunk=1, n_windows=args.windows, make_cache=make,
                                     progress=True)
            rows.append((name, path, ppl, time.perf_counter() - start))
            print(f"{name} ({path}): {ppl:.4f}", file=sys.stderr, flush=True)
            chunked.attention_chunked = blockwise
    cpu_kernels._state[False] = kernels
    base = rows[0][2]
    plain = {name: ppl for name, path, ppl, _ in rows if path == f"plain torch, blocks of {blocks[0]}"}
    print(f"{args.model.name}, wiki.test.raw, first {args.windows} window(s) of {args.ctx} tokens, one token at a "
          f"time, {args.threads} threads")
    print(f"| cache | attention path | perplexity | vs float cache | vs plain torch, blocks of {blocks[0]} | seconds |")
    print("|---|---|---|---|---|---|")
    for name, path, ppl, seconds in rows:
        vs_plain = "" if name == "float" or path == f"plain torch, blocks of {blocks[0]}" else \
            f"{100 * (ppl / plain[name] - 1):+.4f}%"
        vs_float = "" if name == "float" else f"{100 * (ppl / base - 1):+.3f}%"
        print(f"| {name} | {path} | {ppl:.4f} | {vs_float} | {vs_plain} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
