"""The decoder blocks' linear layers of each checkpoint, one decode step's worth (one token), called in model order
with a layer's worth of KV cache read between blocks as attention would, so the weights come from memory as they do
in a model: the kernels' share of a step without the rest of the model around them.

For each checkpoint (float or GPTQ, Qwen v1 layout), every `transformer.h.*` Linear / QuantLinear runs on a random
one-token input through its own forward; before each block a `--context`-position float32 K and V of the model's
shape (heads x head_dim) are summed, one buffer per block as a cache holds them. Rounds repeat the whole pass; the
median pass time is reported, with `--no-kv` the same without the reads (weights then stay in the last-level cache
when they fit).

    python benchmarks/block_linears_speed.py FLOAT32_DIR INT8_DIR INT4_DIR --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_model.modeling_qwen import QWenLMHeadModel  # noqa: E402


def pass_times(path: str, context: int, rounds: int, read_kv: bool) -> tuple[list[float], int]:
    model = QWenLMHeadModel.from_pretrained(path).eval()
    config = model.config
    blocks = [[m for m in block.modules() if type(m).__name__ in ("Linear", "QuantLinear")]
              for block in model.transformer.h]
    inputs = [[torch.randn(1, 1, m.in_features) for m in layers] for layers in blocks]
    head_dim = config.hidden_size // config.num_attention_heads
    kv = [torch.randn(2, config.num_attention_heads, context, head_dim) for _ in blocks] if read_kv else None
    nbytes = sum(t.numel() * t.element_size() for layers in blocks for m in layers for t in m.state_dict().values())
    times = []
    with torch.no_grad():
        for r in range(rounds + 2):  # two untimed passes first
            total = 0.0
            for i, (layers, xs) in enumerate(zip(blocks, inputs)):
                if kv is not None:
                    kv[i].sum()
                start = time.perf_counter()
                for layer, x in zip(layers, xs):
                    layer(x)
                total += time.perf_counter() - start
            if r >= 2:
                times.append(total * 1e3)
    return sorted(times), nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint directories, the first is the baseline")
    p.add_argument("--context", type=int, default=1024, help="KV positions read between blocks")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-kv", action="store_true", help="no KV reads between blocks")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.models:
        times, nbytes = pass_times(path, args.context, args.rounds, not args.no_kv)
        rows.append((path, times[len(times) // 2], times[0], nbytes))
    print(f"torch {torch.__version__}, {args.threads} threads, one token, "
          f"{'no KV reads' if args.no_kv else f'{args.context}-position KV read between blocks'}, "
          f"median of {args.rounds} passes over every block's linear layers")
    print("| checkpoint | weight MB | pass ms (median) | min ms | GB/s | vs first |")
    print("|---|---|---|---|---|---|")
    for path, median, low, nbytes in rows:
        print(f"| {path} | {nbytes / 1e6:.3f} | {median:.2f} | {low:.2f} | {nbytes / median / 1e6:.1f} | "
              f"{rows[0][1] / median:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
