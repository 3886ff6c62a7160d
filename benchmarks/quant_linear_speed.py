"""One-token time of QuantLinear on CPU against float32 F.linear, on Qwen-7B-shaped layers, in one run.

Layers 4096->12288 (c_attn), 4096->4096 (attn c_proj), 4096->11008 (w1/w2), 11008->4096 (mlp c_proj), random
codes/scales/zeros (speed does not depend on the values), g128, float32 activations, batch 1. It times our
QuantLinear with kernel="cpu" (this package's float32 GEMV on the packed words, what "auto" takes on CPU) and with
kernel="int4pack" (torch's CPU int4 kernel in bfloat16: Int4 direct, Int8 as two nibble planes), and the raw torch
candidates that QuantLinear could have used, so the choice is measured here: `_weight_int4pack_mm_for_cpu` with float32 and bfloat16
inputs and `_weight_int8pack_mm` (per-channel scales only, so not exact for g128). `_dyn_quant_matmul_4bit` is not
timed: on this x86 build its matmul refuses every weight `_dyn_quant_pack_4bit_weight` packs ("Expected bias length
to match output dimension", with or without a bias), and it quantizes activations to int8 (not exact) anyway. Each op runs in interleaved rounds; the median time per call is reported.
With --rows N > 1 (batched decode, prefill) only float32 F.linear and kernel="cpu" are timed.

    flock /tmp/bench.lock python benchmarks/quant_linear_speed.py --threads 2
    flock /tmp/bench.lock python benchmarks/quant_linear_speed.py --threads 2 --rows 512 --rounds 3 --calls 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantize.quant_linear import QuantLinear  # noqa: E402

SHAPES = [(4096, 12288), (4096, 4096), (4096, 11008), (11008, 4096)]


def random_layer(bits: int, in_features: int, out_features: int, group_size: int, seed: int,
                 kernel: str) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g)
    scales = torch.rand(n_groups, out_features, generator=g) * 0.01 + 1e-3
    zeros = torch.full((n_groups, out_features), 2 ** (bits - 1))
    g_idx = torch.arange(in_features) // group_size
    return QuantLinear.from_quantized(codes, scales, zeros, g_idx, None, bits, group_size, kernel=kernel)


def median_ms(fns: dict, rounds: int, calls: int) -> dict:
    """Interleave the candidates round by round (so machine load hits them alike); median ms per call."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def candidates(in_features: int, out_features: int, group_size: int, seed: int, rows: int) -> dict:
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features)
    kernels = ("cpu", "int4pack") if rows == 1 else ("cpu",)
    layers = {(bits, kernel): random_layer(bits, in_features, out_features, group_size, seed, kernel)
              for bits in (4, 8) for kernel in kernels}
    for layer in layers.values():
        layer(x)  # prepare (repack) once
    fns = {"float32 F.linear": lambda: F.linear(x, weight)}
    for (bits, kernel), layer in layers.items():
        fns[f"Int{bits} QuantLinear {kernel}"] = lambda layer=layer: layer(x)
    if rows > 1:
        return fns
    packed = layers[4, "int4pack"].int4pack_weight()
    sz32 = packed.scales_zeros.float()
    w8 = torch.randint(-128, 127, (out_features, in_features), dtype=torch.int8)
    s8 = torch.rand(out_features)
    fns["int4pack_mm fp32 in"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed.weight, packed.group,
                                                                                    sz32)
    fns["int8pack_mm bf16 per-channel"] = lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, s8.bfloat16())
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=1, help="input rows per call (default 1: one decoded token)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, g{args.group_size}, float32 activations, {args.rows} "
          "row(s); "
          "median ms per call (ratio = float32 time / this time)")
    totals: dict[str, float] = {}
    for i, (k, n) in enumerate(SHAPES):
        res = median_ms(candidates(k, n, args.group_size, seed=i, rows=args.rows), args.rounds, args.calls)
        base = res["float32 F.linear"]
        cells = ", ".join(f"{name} {ms:.3f} ms ({base / ms:.2f}x)" for name, ms in res.items())
        print(f"{k}->{n}: {cells}", flush=True)
        for name, ms in res.items():
            totals[name] = totals.get(name, 0.0) + ms
    base = totals["float32 F.linear"]
    print("sum of the four layers: " + ", ".join(f"{name} {ms:.2f} ms ({base / ms:.2f}x)"
                                                  for name, ms in totals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
