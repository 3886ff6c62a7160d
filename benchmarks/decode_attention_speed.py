"""Attention for one decoded token over a float32 KV cache on CPU: the fused kernel (`attend_float`) against the
model's plain matmul attention (`eager_attention`) and SDPA, over a whole model's layers read one after the other
(so the cache streams from memory, as in a decode step), in one run.

Each of --layers layers holds K and V of --heads x context x --head-dim float32 positions in buffers reserved with
room for 64 more (as `ReservedCache` keeps them); a pass attends one random query per layer. Rounds interleave the
paths; the median pass time is reported.

    python benchmarks/decode_attention_speed.py --contexts 1024 4096 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache.cpu_kernels import attend_float_cpu  # noqa: E402
from qwen_model.modeling_qwen import eager_attention  # noqa: E402

PATHS = {
    "fused (attend_float)": lambda q, k, v, s: attend_float_cpu(q, k, v, None, s),
    "matmul (eager_attention)": lambda q, k, v, s: eager_attention(q, k, v, None, s),
    "SDPA": lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, scale=s),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = args.head_dim ** -0.5
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers x {args.heads} heads x head_dim "
          f"{args.head_dim}, float32, batch 1; median ms per pass over all layers")
    print("| context | path | ms per pass | GB/s of K/V | vs matmul |")
    print("|---|---|---|---|---|")
    for context in args.contexts:
        layers = [[torch.randn(1, args.heads, context + 64, args.head_dim)[:, :, :context] for _ in "kv"]
                  for _ in range(args.layers)]
        queries = [torch.randn(1, args.heads, 1, args.head_dim) for _ in layers]
        times = {name: [] for name in PATHS}
        with torch.no_grad():
            for r in range(args.rounds + 1):
                for name, path in PATHS.items():
                    start = time.perf_counter()
                    for q, (k, v) in zip(queries, layers):
                        path(q, k, v, scale)
                    if r:  # the first round is a warm-up
                        times[name].append(time.perf_counter() - start)
        nbytes = 2 * args.layers * args.heads * context * args.head_dim * 4
        medians = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        for name, ms in medians.items():
            print(f"| {context} | {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} | "
                  f"{medians['matmul (eager_attention)'] / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
