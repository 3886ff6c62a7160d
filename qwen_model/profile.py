"""Inference speed and peak memory of Qwen checkpoints, as the original Qwen release's speed/memory tables report them.

    python -m qwen_model.profile --model DIR [DIR ...] [--kv float int8 int4] [--context 1024] [--generate 256]
                                 [--batch 1] [--threads 2] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]

Each row (one model x one KV-cache setting) runs in a fresh subprocess, one after the other, so its peak memory is its
own and rows are measured side by side under the same conditions. A row feeds ``--context`` seeded random token ids
(no tokenizer: speed does not depend on the text) of ``--batch`` sequences through the model's own KV-cache path (a
float ``DynamicCache`` or a ``QuantizedKVCache``), then greedily decodes ``--generate`` tokens one at a time, exactly as
``generate()`` does without its bookkeeping. A short warm-up (32 tokens + 2 steps) runs first, so one-time work
(kernel repacking, Triton compiles) is not timed.

Reported per row: prefill tokens/s (context x batch / prefill time), decode tokens/s (new tokens x batch / decode
time, the first new token comes from the prefill), the original's averaged figure (new tokens / whole generation time,
prefill included, per sequence), and peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's
peak resident set (VmHWM, model included) and how much the timed run added over the loaded model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

KV_SETTINGS = {"float": None, "int8": 8, "int4": 4}
DTYPES = ("auto", "float32", "bfloat16", "float16")
WARMUP_CONTEXT, WARMUP_STEPS = 32, 2
MIB = 1 << 20
# A fixed glibc mmap threshold: large tensors get their own mappings, returned to the OS when freed, so the resident
# set follows live tensors (the default dynamic threshold hides freed blocks of up to 32 MiB).
ROW_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def weights_label(model_dir, float_dtype: str) -> str:
    """"int4 g128" for a GPTQ checkpoint (from config.json), else the float dtype the model runs in."""
    qc = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if qc:
        group = qc.get("group_size", -1)
        return f"int{qc['bits']} g{group}" if group and group > 0 else f"int{qc['bits']}"
    return float_dtype


def _make_cache(kv: str):
    from transformers.cache_utils import DynamicCache

    from kvcache.quantized_cache import QuantizedKVCache

    bits = KV_SETTINGS[kv]
    return DynamicCache() if bits is None else QuantizedKVCache(bits=bits)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids, kv: str, steps: int) -> tuple[float, float, int]:
    """Prefill `ids` then decode `steps` tokens greedily; returns (prefill seconds, decode seconds, tokens made)."""
    import torch

    cache = _make_cache(kv)
    _sync(ids.device)
    start = time.perf_counter()
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    prefill = time.perf_counter() - start
    made = 1
    start = time.perf_counter()
    for _ in range(steps - 1):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        made += 1
    _sync(ids.device)
    if made != steps or not torch.isfinite(logits).all():
        raise RuntimeError("generation produced non-finite logits")
    return prefill, time.perf_counter() - start, made


def profile_row(model_dir, kv: str = "float", context: int = 1024, generate: int = 256, batch: int = 1,
                device: str = "cpu", dtype: str = "auto", threads: int | None = None, seed: int = 0) -> dict:
    """Measure one row in this process (see the module docstring); returns its figures as a dict."""
    import torch

    from qwen_model.modeling_qwen import QWenLMHeadModel

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model = QWenLMHeadModel.from_pretrained(model_dir)
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    model = model.to(dev).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 100_000), (batch, context), generator=gen).to(dev)
    with torch.inference_mode():
        _generate(model, ids[:, :WARMUP_CONTEXT], kv, WARMUP_STEPS)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            _reset_peak_rss()
            base = _status_kib("VmRSS") * 1024
        prefill_s, decode_s, made = _generate(model, ids, kv, generate)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _status_kib("VmHWM") * 1024
    run_dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    return {
        "model": str(model_dir), "weights": weights_label(model_dir, run_dtype), "kv": kv, "batch": batch,
        "context": context, "generate": made, "dtype": run_dtype, "device": dev.type,
        "threads": torch.get_num_threads(),
        "prefill_tokens_per_s": batch * context / prefill_s,
        "decode_tokens_per_s": batch * (made - 1) / decode_s if made > 1 else float("nan"),
        "average_tokens_per_s": made / (prefill_s + decode_s),
        "peak_memory_mib": peak / MIB, "added_memory_mib": (peak - base) / MIB,
    }


def _run_row_subprocess(row: dict) -> dict:
    env = {**os.environ, **ROW_ENV}
    if row.get("threads"):
        env["OMP_NUM_THREADS"] = str(row["threads"])
    proc = subprocess.run([sys.executable, "-m", "qwen_model.profile", "--row", json.dumps(row)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"row {row['kv']} cache on {row['model']} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile(models, kvs=("float",), context: int = 1024, generate: int = 256, batch: int = 1, device: str = "cpu",
            dtype: str = "auto", threads: int | None = None, progress: bool = True) -> list[dict]:
    """One row per model x KV setting, each in a fresh subprocess, in order; returns the rows' figures."""
    from tqdm import tqdm

    check_args(models, kvs, context, generate, batch, dtype)
    rows = [{"model_dir": str(m), "model": str(m), "kv": kv, "context": context, "generate": generate,
             "batch": batch, "device": device, "dtype": dtype, "threads": threads} for m in models for kv in kvs]
    results = []
    for row in tqdm(rows, desc="profile", unit="row", disable=not progress):
        results.append(_run_row_subprocess(row))
    return results


def check_args(models, kvs, context: int, generate: int, batch: int, dtype: str) -> None:
    """Raise ValueError / FileNotFoundError with one clear line for bad settings."""
    for kv in kvs:
        if kv not in KV_SETTINGS:
            raise ValueError(f"--kv must be among {tuple(KV_SETTINGS)}, got {kv!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if context < WARMUP_CONTEXT or generate < 1 or batch < 1:
        raise ValueError(f"need --context >= {WARMUP_CONTEXT}, --generate >= 1 and --batch >= 1")
    for m in models:
        config = Path(m) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"not a checkpoint directory (no config.json): {m}")
        max_pos = json.loads(config.read_text()).get("max_position_embeddings")
        if max_pos and context + generate > 4 * max_pos:
            raise ValueError(f"--context + --generate = {context + generate} is beyond 4x the model's "
                             f"max_position_embeddings ({max_pos}) in {m}")


def format_table(results: list[dict]) -> str:
    """The rows as a Markdown table."""
    cpu = all(r["device"] == "cpu" for r in results)
    mem = "peak RSS MiB (added)" if cpu else "peak allocated MiB"
    lines = [f"| model | weights | KV cache | batch | context | new tokens | prefill tok/s | decode tok/s | "
             f"average tok/s | {mem} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        memory = f"{r['peak_memory_mib']:.0f} ({r['added_memory_mib']:+.0f})" if cpu else f"{r['peak_memory_mib']:.0f}"
        lines.append(f"| {Path(r['model']).name} | {r['weights']} | {r['kv']} | {r['batch']} | {r['context']} | "
                     f"{r['generate']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['average_tokens_per_s']:.2f} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_model.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", help="checkpoint directories (float or GPTQ)")
    p.add_argument("--kv", nargs="+", default=["float"], help="KV caches to profile: float int8 int4 (default float)")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--generate", type=int, default=256, help="new tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help=f"activation dtype, one of {DTYPES} (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per row")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.row is not None:
            row = json.loads(args.row)
            print(json.dumps(profile_row(row["model_dir"], row["kv"], row["context"], row["generate"], row["batch"],
                                         row["device"], row["dtype"], row["threads"])))
            return 0
        if not args.model:
            raise ValueError("--model needs at least one checkpoint directory")
        device = args.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        results = profile(args.model, args.kv, args.context, args.generate, args.batch, device, args.dtype,
                          args.threads)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
