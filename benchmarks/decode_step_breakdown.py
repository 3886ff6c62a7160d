"""Where a decode step's time goes, per checkpoint: the decoder blocks' linear layers, the fused decode step (all
blocks in one call, GPTQ checkpoints on CPU), the lm_head, and the rest (attention over the cache, norms, rotary,
Python), in one process, to say what bounds the quantized/float ratio.

Each checkpoint (float or GPTQ, Qwen v1 layout) gets --batch random prompts of --context tokens in a reserved float
cache (as `generate()` uses), 3 untimed decode steps, then --steps timed ones; the linear layers, the fused step and
the lm_head are timed by wrapping them (wall time, so thread pools and Python in them count): each block's c_attn
and attn.c_proj, and its MLP whole (three layers and the SwiGLU gate, which GPTQ layers run as one call at decode).
--op-by-op turns the fused step off, so that a GPTQ checkpoint's blocks run (and are timed) layer by layer.

    python benchmarks/decode_step_breakdown.py FLOAT32_DIR INT8_DIR INT4_DIR --threads 2 [--op-by-op] [--batch 8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache.reserved import ReservedCache  # noqa: E402
from qwen_model import cpu_decode_step, modeling_qwen  # noqa: E402
from qwen_model.modeling_qwen import QWenLMHeadModel  # noqa: E402


def timed(module, totals: dict, key: str) -> None:
    forward = module.forward

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        return out

    module.forward = wrapped


def fused_step(totals: dict, off: bool) -> None:
    """The model's fused decode step timed into totals["fused blocks"] (when it ran), or turned off."""
    real = cpu_decode_step.decode_blocks_cpu

    def wrapped(*args):
        start = time.perf_counter()
        out = None if off else real(*args)
        if out is not None:
            totals["fused blocks"] += time.perf_counter() - start
        return out

    modeling_qwen.decode_blocks_cpu = wrapped


def breakdown(path: str, context: int, steps: int, op_by_op: bool, batch: int = 1) -> dict:
    model = QWenLMHeadModel.from_pretrained(path).eval()
    totals = {"block linears": 0.0, "fused blocks": 0.0, "lm_head": 0.0}
    fused_step(totals, op_by_op)
    for block in model.transformer.h:  # the MLP whole: GPTQ layers run it as one fused call at decode
        for module in (block.attn.c_attn, block.attn.c_proj, block.mlp):
            timed(module, totals, "block linears")
    timed(model.lm_head, totals, "lm_head")
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, context),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, past_key_values=ReservedCache(context + steps + 8, model.config), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
        totals.update({k: 0.0 for k in totals})
        start = time.perf_counter()
        for _ in range(steps):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
        step = (time.perf_counter() - start) / steps * 1e3
    parts = {k: v / steps * 1e3 for k, v in totals.items()}
    return {"step": step, **parts, "rest": step - sum(parts.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint directories, the first is the baseline")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--op-by-op", action="store_true", help="turn the fused decode step off")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [(path, breakdown(path, args.context, args.steps, args.op_by_op, args.batch)) for path in args.models]
    base = rows[0][1]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.context}-token context, batch {args.batch}, "
          f"mean ms per decode step over {args.steps} steps, fused decode step {'off' if args.op_by_op else 'on'}")
    print("| checkpoint | step ms | block linears ms | fused blocks ms | lm_head ms | rest ms | step vs first | "
          "linears vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for path, r in rows:
        linears = (f"{base['block linears'] / r['block linears']:.2f}x" if r["block linears"] and base["block linears"]
                   else "-")
        print(f"| {path} | {r['step']:.2f} | {r['block linears']:.2f} | {r['fused blocks']:.2f} | {r['lm_head']:.2f} | "
              f"{r['rest']:.2f} | {base['step'] / r['step']:.2f}x | {linears} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
