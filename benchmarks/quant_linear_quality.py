"""Do the CPU fast paths change what a real model computes? Logits and WikiText-2 perplexity of GPTQ checkpoints of
SmolLM2-135M (Qwen v1 layout) with QuantLinear kernel="int4pack" and kernel="auto" against kernel="torch" (the
dequantize reference), float32 activations.

Logits: relative error (Frobenius norm of the difference over that of the reference) on the first 512-token window,
as the model runs and with the reference's lm_head swapped in (the fast model keeps the lm_head in the checkpoint's
float16, the reference in float32), which isolates what the quantized layers' kernels change.
Perplexity: the convention of ../shared/data/README.md (wiki.test.raw, ctx 512), the first --windows windows.

    python -m quantize.gptq_int4 --model SMOL --method rtn --out INT4   # and quantize.gptq_int8 ... --out INT8
    flock /tmp/bench.lock python benchmarks/quant_linear_quality.py INT4 INT8 --threads 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qwen_model.modeling_qwen import QWenLMHeadModel  # noqa: E402
from qwen_model.tokenization_qwen import load_tokenizer  # noqa: E402
from quantize.evaluate import perplexity  # noqa: E402

WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"
# "int4pack" forced for every input; "auto" as a user gets it (bf16 dequantize + GEMM for 64+ rows, int4pack for
# fewer, the lm_head in the checkpoint's float16), both against the float32 dequantize reference "torch".
KERNELS = ("torch", "int4pack", "auto")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="GPTQ checkpoint directories")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in args.models:
        tok = load_tokenizer(path)
        ids = tok(WIKI.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        window = torch.tensor([ids[:args.ctx]])
        logits, ppl, same_head = {}, {}, {}
        reference = QWenLMHeadModel.from_pretrained(path, gptq_kernel="torch").eval()
        for kernel in KERNELS:
            model = reference if kernel == "torch" else QWenLMHeadModel.from_pretrained(path, gptq_kernel=kernel).eval()
            with torch.no_grad():
                logits[kernel] = model(window).logits
                if kernel != "torch":  # the fast model's lm_head is the checkpoint's float16; the reference's float32
                    own_head, model.lm_head = model.lm_head, reference.lm_head
                    same_head[kernel] = model(window).logits
                    model.lm_head = own_head
            ppl[kernel] = perplexity(model, ids, ctx=args.ctx, n_windows=args.windows, progress=False)
        for kernel in KERNELS[1:]:
            ref = logits["torch"]
            rel = ((logits[kernel] - ref).norm() / ref.norm()).item()
            rel_body = ((same_head[kernel] - ref).norm() / ref.norm()).item()
            drift = (ppl[kernel] / ppl["torch"] - 1) * 100
            print(f"{path}: {kernel}: logits rel. error {rel:.2e} ({rel_body:.2e} with the reference's lm_head); "
                  f"perplexity ({args.windows} x {args.ctx}) torch {ppl['torch']:.3f}, {kernel} {ppl[kernel]:.3f} "
                  f"({drift:+.3f}%)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
