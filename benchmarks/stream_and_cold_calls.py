"""What bounds a CPU decode step on this machine: the bandwidth of a stream read by the working set's size, and what
one GEMV call costs when the data and the code it touches were evicted by a stream (as every call in a decode step
is: the weights, lm_head and float KV cache of a step stream through every cache level) against the same call hot.

Bandwidth: `torch.sum` over float32 buffers of each size, 2 threads, median of repeated passes. Calls: SmolLM2's
576 -> N Int4 layer (g128) through this package's GEMV, cold after a `--sweep-mb` write sweep, hot in a loop, and
after another GEMV call (warm code, cold data); per-call time and the bandwidth it implies.

    python benchmarks/stream_and_cold_calls.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantize.cpu_gptq import load_kernels  # noqa: E402


def stream_bandwidth(mib: int) -> float:
    x = torch.randn(mib << 18)
    for _ in range(3):
        x.sum()
    times = []
    for _ in range(max(5, 512 // mib)):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return (mib << 20) / statistics.median(times) / 1e9


def int4_layer(n: int, k: int = 576, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // 128)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.01).half()
    zeros = torch.full((groups, n), 8.0).half()
    group_words = torch.clamp(torch.arange(groups + 1) * 16, max=k // 8)
    return words, scales, zeros, group_words


def call_times(kernels, n: int, sweep: torch.Tensor, rounds: int) -> dict:
    layers = [int4_layer(n, seed=s) for s in range(4)]
    other = int4_layer(64, seed=9)
    x = torch.randn(1, 576)

    def timed(layer):
        start = time.perf_counter()
        kernels.gemv(x, *layer, 4, None)
        return time.perf_counter() - start

    cold, warm_code = [], []
    for r in range(rounds):
        sweep.add_(1.0)
        cold.append(timed(layers[r % 4]))
        sweep.add_(1.0)
        kernels.gemv(x, *other, 4, None)
        warm_code.append(timed(layers[r % 4]))
    for _ in range(20):
        timed(layers[0])
    hot = [timed(layers[0]) for _ in range(200)]
    return {"cold": statistics.median(cold), "warm code, cold data": statistics.median(warm_code),
            "hot": statistics.median(hot), "bytes": layers[0][0].numel() * 4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep-mb", type=int, default=256, help="MiB written between cold calls")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-mib", type=int, default=512, help="largest stream working set")
    p.add_argument("--columns", type=int, nargs="+", default=[256, 1536, 4096, 16384], help="GEMV output sizes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = load_kernels()
    if kernels is None:
        print("the CPU GPTQ kernels did not build here", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| working set MiB | torch.sum GB/s |\n|---|---|")
    for mib in (m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if m <= args.max_mib):
        print(f"| {mib} | {stream_bandwidth(mib):.1f} |")
    sweep = torch.zeros(args.sweep_mb << 18)
    print(f"\nInt4 576 -> N GEMV, median us per call (GB/s of packed words); cold = after a {args.sweep_mb} MiB sweep")
    print("| N | words KiB | cold | warm code, cold data | hot |\n|---|---|---|---|---|")
    for n in args.columns:
        t = call_times(kernels, n, sweep, args.rounds)
        cells = [f"{t[key] * 1e6:.1f} ({t['bytes'] / t[key] / 1e9:.1f})" for key in ("cold", "warm code, cold data",
                                                                                      "hot")]
        print(f"| {n} | {t['bytes'] >> 10} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
