"""Time the GPTQ solver on Qwen-7B-shaped layers and print a markdown table.

Per layer: a Hessian from random inputs (default 16 x 512 rows, timed separately), a random weight, and one
gptq_quantize call (default int4, group 128, sym, damp 0.01, group-aware reordering, as in the peer comparison).
CPU time is printed beside wall time: on a shared machine it shows how much of the wall time was spent waiting.

    python benchmarks/gptq_speed.py --layers 4096x12288,4096x4096,4096x11008,11008x4096 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantize.gptq import accumulate_hessian, gptq_quantize  # noqa: E402

QWEN_7B_LAYERS = "4096x12288,4096x4096,4096x11008,11008x4096"


def parse_layers(text: str) -> list[tuple[int, int]]:
    """'IN1xOUT1,IN2xOUT2' -> [(in, out), ...]."""
    layers = []
    for item in text.split(","):
        try:
            in_features, out_features = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad layer {item!r}: expected INxOUT, e.g. 4096x12288") from None
        layers.append((in_features, out_features))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=QWEN_7B_LAYERS, help="comma-separated INxOUT shapes")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=["gar", "natural", "desc_act"], default="gar")
    parser.add_argument("--repeats", type=int, default=1, help="solves per layer; the fastest is reported")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int{args.bits} g{args.group_size}, "
          f"order {args.order}, Hessian from {args.samples}x{args.seqlen} random inputs\n")
    print("| layer (in -> out) | Hessian build (s) | GPTQ solve, wall (s) | GPTQ solve, CPU time (s) |")
    print("|---|---|---|---|")
    for in_features, out_features in parse_layers(args.layers):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        H, n = None, 0
        for _ in range(args.samples):
            H, n = accumulate_hessian(H, n, torch.randn(args.seqlen, in_features, generator=gen))
        hessian_s = time.perf_counter() - start
        W = torch.randn(out_features, in_features, generator=gen) * 0.02
        solves = []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            gptq_quantize(W, H, args.bits, args.group_size, desc_act=args.order == "desc_act",
                          act_group_aware=args.order == "gar")
            solves.append((time.perf_counter() - start, time.process_time() - start_cpu))
        wall, cpu = min(solves)
        print(f"| {in_features} -> {out_features} | {hessian_s:.2f} | {wall:.2f} | {cpu:.2f} |", flush=True)
        del H, W


if __name__ == "__main__":
    main()
