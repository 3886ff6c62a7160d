"""KV-cache bytes of Qwen-7B with and without cache quantization, counted exactly on real caches.

For every (batch, seq) cell, a ``QuantizedKVCache`` (int8; 4-bit with its default ``channel_groups`` keys, whose
float residual is empty at these lengths, multiples of 64) and a ``DynamicCache`` (bf16)
are filled through ``update()`` with random Qwen-7B-shaped K/V (32 layers x 32 heads x head_dim 128, bf16: one
prefill plus a few single-token decode steps) and measured with ``cache_nbytes``. Cells too large for this machine
are filled with fewer layers and/or a smaller batch (a divisor of the real one) and scaled up exactly: every layer
and every batch row holds the same number of bytes, so the byte count is linear in both. The output says which
cells were scaled.

    python benchmarks/kv_memory.py                     # full grid, bs {1,4,16,32,64,100} x sl {512..8192}
    python benchmarks/kv_memory.py --batch 1,4 --seq 512,1024 --budget-mib 128
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache.quantized_cache import QuantizedKVCache, cache_nbytes  # noqa: E402
from transformers import DynamicCache  # noqa: E402

QWEN_7B = {"vocab": 151936, "hidden": 4096, "layers": 32, "heads": 32, "head_dim": 128, "intermediate": 22016}
BATCHES = (1, 4, 16, 32, 64, 100)
SEQS = (512, 1024, 2048, 4096, 8192)
DECODE_STEPS = 4


def qwen7b_param_count(cfg: dict = QWEN_7B) -> int:
    """Parameters of Qwen-7B: untied embedding and lm_head, c_attn with bias, w1/w2/c_proj MLP, RMSNorm weights."""
    hidden, ff = cfg["hidden"], cfg["intermediate"] // 2
    per_layer = (
        hidden * 3 * hidden + 3 * hidden  # attn.c_attn weight + bias
        + hidden * hidden  # attn.c_proj
        + 3 * hidden * ff  # mlp.w1, mlp.w2, mlp.c_proj
        + 2 * hidden  # ln_1, ln_2
    )
    return 2 * cfg["vocab"] * hidden + cfg["layers"] * per_layer + hidden  # wte, lm_head, blocks, ln_f


@dataclass
class Cell:
    """Exact cache bytes of one (batch, seq) cell, and how much of it was actually filled."""

    batch: int
    seq: int
    bf16_bytes: int
    int8_bytes: int
    int4_bytes: int
    filled_layers: int
    filled_batch: int

    @property
    def scaled(self) -> bool:
        return self.filled_layers != QWEN_7B["layers"] or self.filled_batch != self.batch


def _fill(cache, layers: int, batch: int, seq: int, heads: int, head_dim: int, dtype, seed: int) -> int:
    """Fills ``layers`` layers with ``seq`` tokens (prefill + single-token decode steps); returns cache_nbytes."""
    gen = torch.Generator().manual_seed(seed)
    steps = min(DECODE_STEPS, seq - 1)
    chunks = [seq - steps] + [1] * steps
    for n in chunks:
        k = torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype)
        v = torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype)
        for layer in range(layers):
            cache.update(k, v, layer)
    return cache_nbytes(cache)


def plan_fill(batch: int, seq: int, layers: int, heads: int, head_dim: int, budget_bytes: int) -> tuple[int, int]:
    """(layers, batch) to actually fill so that the bf16 K/V stays within ``budget_bytes``; batch divides ``batch``."""
    per_row_layer = 2 * heads * seq * head_dim * 2  # K and V, bf16
    filled_batch = max((d for d in range(1, batch + 1) if batch % d == 0 and d * per_row_layer <= budget_bytes),
                       default=1)
    filled_layers = max(1, min(layers, budget_bytes // (filled_batch * per_row_layer)))
    return filled_layers, filled_batch


def measure_cell(batch: int, seq: int, budget_bytes: int = 256 << 20, cfg: dict = QWEN_7B) -> Cell:
    """Fills bf16, int8 and 4-bit caches for one cell (scaled down to the budget) and returns exact full-size bytes."""
    layers, heads, head_dim = cfg["layers"], cfg["heads"], cfg["head_dim"]
    filled_layers, filled_batch = plan_fill(batch, seq, layers, heads, head_dim, budget_bytes)
    factor_num, factor_den = layers * batch, filled_layers * filled_batch

    def full_size(measured: int) -> int:
        if measured % factor_den:
            raise ValueError(f"cache bytes {measured} not divisible by filled layers x batch {factor_den}")
        return measured // factor_den * factor_num

    shape = (filled_layers, filled_batch, seq, heads, head_dim, torch.bfloat16)
    return Cell(
        batch=batch,
        seq=seq,
        bf16_bytes=full_size(_fill(DynamicCache(), *shape, seed=0)),
        int8_bytes=full_size(_fill(QuantizedKVCache(bits=8), *shape, seed=0)),
        int4_bytes=full_size(_fill(QuantizedKVCache(bits=4), *shape, seed=0)),
        filled_layers=filled_layers,
        filled_batch=filled_batch,
    )


def kv_ratio(bits: int, batch: int, seq: int, budget_bytes: int = 64 << 20) -> float:
    """Quantized / bf16 cache bytes of one Qwen-7B cell (used by the CI memory gate)."""
    cell = measure_cell(batch, seq, budget_bytes)
    return (cell.int8_bytes if bits == 8 else cell.int4_bytes) / cell.bf16_bytes


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def render(cells: list[Cell], batches, seqs) -> str:
    """Markdown tables: bf16 / int8 / 4-bit cache GB, totals with bf16 weights, and quantized/bf16 ratios."""
    weights = qwen7b_param_count() * 2
    by_key = {(c.batch, c.seq): c for c in cells}
    header = "| bs \\ sl | " + " | ".join(str(s) for s in seqs) + " |\n|---|" + "---|" * len(seqs)

    def table(title: str, fmt) -> str:
        rows = [f"| {b} | " + " | ".join(fmt(by_key[(b, s)]) for s in seqs) + " |" for b in batches]
        return f"**{title}**\n\n{header}\n" + "\n".join(rows) + "\n"

    out = [
        f"Qwen-7B: {qwen7b_param_count():,} parameters, bf16 weights {_gb(weights)} GB (GB = 1e9 bytes).\n",
        table("KV cache GB, bf16 (no quantization) -- cache / weights + cache", lambda c: f"{_gb(c.bf16_bytes)} / "
              f"{_gb(weights + c.bf16_bytes)}"),
        table("KV cache GB, int8 -- cache / weights + cache", lambda c: f"{_gb(c.int8_bytes)} / "
              f"{_gb(weights + c.int8_bytes)}"),
        table("KV cache GB, 4-bit -- cache / weights + cache", lambda c: f"{_gb(c.int4_bytes)} / "
              f"{_gb(weights + c.int4_bytes)}"),
        table("Ratio quantized / bf16 cache bytes -- int8 / 4-bit",
              lambda c: f"{c.int8_bytes / c.bf16_bytes:.4f} / {c.int4_bytes / c.bf16_bytes:.4f}"),
    ]
    scaled = [c for c in cells if c.scaled]
    if scaled:
        out.append(
            "Scaled cells (filled layers x batch, then multiplied up exactly; bytes are linear in both): "
            + ", ".join(f"bs{c.batch}/sl{c.seq}: {c.filled_layers}L x b{c.filled_batch}" for c in scaled)
            + "\n"
        )
    return "\n".join(out)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=_int_list, default=list(BATCHES))
    parser.add_argument("--seq", type=_int_list, default=list(SEQS))
    parser.add_argument("--budget-mib", type=int, default=256, help="max bf16 K/V actually filled per cell")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = [measure_cell(b, s, args.budget_mib << 20) for b in args.batch for s in args.seq]
    print(render(cells, args.batch, args.seq))


if __name__ == "__main__":
    main()
