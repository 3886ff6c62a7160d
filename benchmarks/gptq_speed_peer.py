"""GPTQ solve time of our `gptq_quantize` against the peer library GPTQModel's `GPTQ` class, same weights, same
Hessian, in one run, as a markdown table.

Per layer (default: Qwen-7B shapes): a Hessian H = 2/n X^T X from random inputs (default 16 x 512 rows), a random
weight, then one solve each (int4, group 128, sym, damp 0.01, group-aware column order, blocksize 128). The peer is
fed H directly (its calibration hooks are bypassed) and runs on the CPU in float32 like ours. Besides time, both
results are scored with the GPTQ objective tr((W - Q) H (W - Q)^T) / out on the first rows, to show that the two
solve the same problem equally well. Other processes share the CPU: compare the ratio, not absolute seconds.
The peer inverts H with torch.cholesky_inverse, whose multi-threaded CPU path degrades badly when other processes
compete for the cores (2048 x 2048 on a loaded 2-core machine: 0.7 s with 1 thread, 5.5 s with 2), so on a busy
machine the peer's times inflate more than ours.

    pip install gptqmodel==7.6.0 torch==2.13.0        # the peer
    GPTQMODEL_CPU_WORKERS=2 python benchmarks/gptq_speed_peer.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gptq_speed import QWEN_7B_LAYERS, parse_layers  # noqa: E402
from quantize.gptq import accumulate_hessian, gptq_quantize  # noqa: E402

SCORE_ROWS = 256


def peer_solver(bits: int, group_size: int, damp: float):
    """A function (W, H, n) -> dequantized Q that runs GPTQModel's GPTQ.quantize on a given Hessian."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=True, desc_act=False, act_group_aware=True,
                          damp_percent=damp, offload_to_disk=False)

    def solve(W: torch.Tensor, H: torch.Tensor, n: int) -> torch.Tensor:
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        task = GPTQ(layer, qcfg=qcfg)
        task.quantizer.configure(perchannel=True)  # what GPTQModel's own processor does before a solve
        task.H, task.nsamples = H.clone(), n
        return task.quantize(blocksize=128)[0]

    return solve


def objective(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's layer loss tr(D H D^T) / rows on the first SCORE_ROWS rows, D = W - Q."""
    D = (W[:SCORE_ROWS] - Q[:SCORE_ROWS].float())
    return float((D @ H * D).sum() / D.shape[0])


def timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=QWEN_7B_LAYERS, help="comma-separated INxOUT shapes")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="solves per layer and solver; the fastest is kept")
    args = parser.parse_args()

    peer = peer_solver(args.bits, args.group_size, args.damp)
    torch.set_num_threads(args.threads)  # after importing the peer, which may change it
    import gptqmodel

    print(f"torch {torch.__version__}, gptqmodel {gptqmodel.__version__}, {torch.get_num_threads()} threads, "
          f"int{args.bits} g{args.group_size} sym, damp {args.damp}, group-aware order, Hessian from "
          f"{args.samples}x{args.seqlen} random inputs\n")
    print("| layer (in -> out) | ours wall (s) | peer wall (s) | ours/peer wall | ours CPU (s) | peer CPU (s) "
          "| objective ours | objective peer |")
    print("|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for in_features, out_features in parse_layers(args.layers):
        gen = torch.Generator().manual_seed(0)
        H, n = None, 0
        for _ in range(args.samples):
            H, n = accumulate_hessian(H, n, torch.randn(args.seqlen, in_features, generator=gen))
        W = torch.randn(out_features, in_features, generator=gen) * 0.02
        runs = {"ours": [], "peer": []}
        for _ in range(args.repeats):  # alternate, so both see the same background load
            runs["ours"].append(timed(lambda: gptq_quantize(W, H, args.bits, args.group_size, damp_percent=args.damp,
                                                            act_group_aware=True).weight))
            runs["peer"].append(timed(lambda: peer(W, H, n)))
        best = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
        (q_ours, wall_ours, cpu_ours), (q_peer, wall_peer, cpu_peer) = best["ours"], best["peer"]
        totals[0] += wall_ours
        totals[1] += wall_peer
        print(f"| {in_features} -> {out_features} | {wall_ours:.2f} | {wall_peer:.2f} | {wall_ours / wall_peer:.2f} "
              f"| {cpu_ours:.2f} | {cpu_peer:.2f} | {objective(W, q_ours, H):.4g} | {objective(W, q_peer, H):.4g} |",
              flush=True)
        del H, W, runs, best
    print(f"| total | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f} | | | | |")


if __name__ == "__main__":
    main()
