"""Decode tokens/s of a Qwen model with a float cache, the int8 cache and the 4-bit cache at long contexts, side by side.

One process, one model (e.g. SmolLM2-135M converted by ``../shared/tools/smollm2_to_qwen.py``), batch 1. For each
context, one cache of each kind is filled to that many positions through ``cache.update`` with random keys/values
of the model's shape (decode speed does not depend on their values, and this skips a long prefill; the 4-bit cache
takes them as pre-RoPE keys at positions 0, 1, ...), then the caches take turns: each round times ``--steps``
greedy decode steps of the real model with every cache in turn, so the machine's load falls on all of them alike.
Reported: the median over rounds of tokens/s, and its ratio to the float cache's in the same run. On CPU the
quantized caches go through the CPU kernels of ``kvcache.cpu_kernels`` (``quantized_attention`` backend "auto").

    python benchmarks/kv_decode_speed.py --model DIR                       # contexts 1024,4096,16384, 2 threads
    python benchmarks/kv_decode_speed.py --model DIR --contexts 4096 --rounds 3 --steps 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHES = ("float", "int8", "int4")
FILL_CHUNK = 1024


def make_cache(name: str, capacity: int):
    """The cache `generate()` builds for a call of ``capacity`` positions: room reserved up front for every kind
    (``kvcache.reserved``), so no kind copies its layers per decoded token."""
    from kvcache.quantized_cache import QuantizedKVCache
    from kvcache.reserved import ReservedCache

    if name == "float":
        return ReservedCache(capacity)
    return QuantizedKVCache(bits=8 if name == "int8" else 4, capacity=capacity)


def fill(cache, config, context: int, gen: torch.Generator) -> None:
    """Fills every layer of ``cache`` to ``context`` positions with random states of the model's shape."""
    heads, head_dim = config.num_attention_heads, config.kv_channels
    for start in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - start)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(1, heads, n, head_dim, generator=gen),
                         torch.randn(1, heads, n, head_dim, generator=gen), layer)


def decode_rate(model, cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start), token


def run(model, contexts, caches, rounds: int, steps: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for context in contexts:
            filled = {}
            for name in caches:
                filled[name] = make_cache(name, context + (rounds * steps + 1))
                fill(filled[name], model.config, context, gen)
            tokens = {name: torch.tensor([[1]]) for name in caches}
            for name in caches:  # warm-up step: first-call allocations are not part of the steady state
                _, tokens[name] = decode_rate(model, filled[name], tokens[name], 1)
            rates = {name: [] for name in caches}
            for _ in tqdm(range(rounds), desc=f"context {context}"):
                for name in caches:
                    rate, tokens[name] = decode_rate(model, filled[name], tokens[name], steps)
                    rates[name].append(rate)
            base = statistics.median(rates["float"]) if "float" in rates else None
            for name in caches:
                median = statistics.median(rates[name])
                rows.append({"context": context, "cache": name, "tokens_per_s": median,
                             "vs_float": median / base if base else None, "rounds": rates[name]})
            del filled
    return rows


def render(rows: list[dict]) -> str:
    out = ["| context | cache | decode tokens/s (median) | vs float cache |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_float']:.2f}x" if r["vs_float"] is not None else "-"
        out.append(f"| {r['context']} | {r['cache']} | {r['tokens_per_s']:.2f} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Qwen v1 checkpoint directory")
    parser.add_argument("--contexts", default="1024,4096,16384", help="comma-separated cache lengths")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated subset of {', '.join(CACHES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per cache and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    caches = args.caches.split(",")
    if [c for c in caches if c not in CACHES]:
        parser.error(f"unknown caches in {args.caches!r}; choose from {', '.join(CACHES)}")
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts must be comma-separated integers, got {args.contexts!r}")
    if min(contexts) < 1 or args.rounds < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--contexts, --rounds, --steps and --threads must be positive")
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a checkpoint directory (no config.json)")

    from qwen_model.modeling_qwen import QWenLMHeadModel

    torch.set_num_threads(args.threads)
    model = QWenLMHeadModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    rows = run(model, contexts, caches, args.rounds, args.steps)
    print(f"{args.model.name}, float32 weights, batch 1, {args.threads} threads, {args.rounds} rounds x "
          f"{args.steps} steps per cache")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
