"""How far SmolLM2-135M's two layouts (Qwen v1 copy, native Llama) drift apart block by block, in float32.

The two compute the same function; their float32 arithmetic differs only in rounding (fused vs split q/k/v
matmuls, repeated vs grouped KV heads, the norms' and rotary's operation order). GPTQ's rounding decisions react to
differences that small, which is what separates the two layouts' GPTQ perplexities (benchmarks/RESULTS.md). Prints
each block's output difference (max and norm, relative to the Qwen v1 output) on calibration samples of the
PEER_RESULTS protocol.

    python benchmarks/layout_divergence.py --qwen QWEN_DIR --native LLAMA_DIR [--samples 4] [--threads 1]
"""
import argparse
import json
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qwen", type=Path, required=True, help="SmolLM2 in the Qwen v1 layout")
    p.add_argument("--native", type=Path, required=True, help="the same weights in the Llama layout")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from qwen_model.modeling_qwen import QWenLMHeadModel

    torch.set_num_threads(args.threads)
    samples = json.loads((SHARED / "data" / "calib_c4_smollm2_128x512.json").read_text())
    samples = samples["samples"] if isinstance(samples, dict) else samples
    ids = torch.tensor([s if isinstance(s, list) else s["input_ids"] for s in samples[:args.samples]])
    native = AutoModelForCausalLM.from_pretrained(args.native, dtype=torch.float32).eval()
    qwen = QWenLMHeadModel.from_pretrained(args.qwen).eval()
    outs = {"native": [], "qwen": []}
    for key, blocks in (("native", native.model.layers), ("qwen", qwen.transformer.h)):
        for block in blocks:
            block.register_forward_hook(
                lambda m, a, o, key=key: outs[key].append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        native(ids)
        qwen(ids)
    print(f"{args.samples} x {ids.shape[1]} calibration tokens, {args.threads} thread(s)")
    print("| block | max abs diff / max abs | norm diff / norm |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(outs["native"], outs["qwen"])):
        peak, norm = ((a - b).abs().max() / b.abs().max()).item(), ((a - b).norm() / b.norm()).item()
        print(f"| {i} | {peak:.1e} | {norm:.1e} |")


if __name__ == "__main__":
    main()
