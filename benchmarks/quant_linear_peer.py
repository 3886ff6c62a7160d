"""Decode speed of our CPU QuantLinear against GPTQModel's TORCH_FUSED backend on the same Int4 GPTQ checkpoint,
in one run (2 threads, a --context-token prompt, batch 1, greedy).

The checkpoint is a Llama-layout SmolLM2-135M (benchmarks/smollm2_llama.py) quantized by our CLI
(`python -m quantize.gptq_int4 --model LLAMA_DIR --method rtn --group-size 64`; GPTQModel's CPU int4 kernel refuses
g128 on K=576). Rows, all through the same timing loop on transformers' LlamaForCausalLM (only the linear layers
differ): the float32 model; ours (quantize.native_checkpoint.load_native_quantized, kernel="auto" -> "cpu") with
float32 float parts, and with bfloat16 ones (embedding, norms, lm_head, activations and the KV cache: the dtype the
peer runs in); GPTQModel 7.6.0 `GPTQModel.load(..., backend="torch_fused", dtype=torch.bfloat16)`. Seeded random
prompt ids; one warm-up generation per row first; rows repeat --rounds times interleaved and the best round is
reported.

    flock /tmp/bench.lock python benchmarks/quant_linear_peer.py --float LLAMA_DIR --int4 INT4_G64_DIR --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed_generate(model, ids, steps: int) -> tuple[float, float]:
    """Prefill `ids`, then `steps` greedy decode steps on a DynamicCache; (prefill seconds, decode tokens/s)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    if not torch.isfinite(out.logits).all():
        raise RuntimeError("non-finite logits")
    return prefill, steps / (time.perf_counter() - start)


def peer_view(int4_dir: str, work: Path) -> str:
    """The checkpoint as GPTQModel reads it: the same tensors (symlinked), the settings without our `method`
    field, which GPTQModel 7.6.0 takes for its quantization method and refuses when it is "rtn"."""
    work.mkdir(parents=True, exist_ok=True)
    for f in Path(int4_dir).iterdir():
        target = work / f.name
        if f.name in ("config.json", "quantize_config.json"):
            cfg = json.loads(f.read_text())
            (cfg.get("quantization_config", cfg)).pop("method", None)  # checkpoints written before the key was "solver"
            target.write_text(json.dumps(cfg))
        elif not target.exists():
            target.symlink_to(f.resolve())
    return str(work)


def load_rows(float_dir: str, int4_dir: str) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    from quantize.native_checkpoint import load_native_quantized

    rows = {"float32": AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval(),
            "ours int4 (float32 model)": load_native_quantized(int4_dir, kernel="auto"),
            "ours int4 (bfloat16 model)": load_native_quantized(int4_dir, dtype=torch.bfloat16, kernel="auto")}
    from gptqmodel import GPTQModel

    with tempfile.TemporaryDirectory() as tmp:
        peer = GPTQModel.load(peer_view(int4_dir, Path(tmp) / "ckpt"), device="cpu", backend="torch_fused",
                              dtype=torch.bfloat16)
    rows["GPTQModel TORCH_FUSED int4 (bfloat16 model)"] = peer.model.eval()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", required=True, help="float Llama-layout checkpoint")
    p.add_argument("--int4", required=True, help="Int4 g64 GPTQ checkpoint of it")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--generate", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = load_rows(args.float, args.int4)
    vocab = rows["float32"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    best = {name: (float("inf"), 0.0) for name in rows}
    with torch.inference_mode():
        for model in rows.values():
            timed_generate(model, ids[:, :32], 2)
        for _ in range(args.rounds):
            for name, model in rows.items():
                prefill, decode = timed_generate(model, ids, args.generate)
                best[name] = (min(best[name][0], prefill), max(best[name][1], decode))
    base_prefill, base_decode = best["float32"]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.context}-token prompt, {args.generate} new "
          f"tokens, batch 1, best of {args.rounds} rounds")
    print("| row | prefill tokens/s | vs float32 | decode tokens/s | vs float32 |")
    print("|---|---|---|---|---|")
    for name, (prefill, decode) in best.items():
        print(f"| {name} | {args.context / prefill:.1f} | {base_prefill / prefill:.2f}x | {decode:.2f} | "
              f"{decode / base_decode:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
