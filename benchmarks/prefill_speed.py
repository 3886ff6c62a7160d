"""Prefill speed of checkpoints side by side in one process, as a ratio to the first one.

Each round runs every checkpoint's forward over the same --context-token prompt in turn (a fresh reserved float cache,
logits of the last position only: what `generate()` does before its first token), after one untimed round, so a
drift of the machine hits all of them alike (the profiler runs each row in its own process, one after the other, and
its prefill figures swing 10-20% between invocations on the 2-core box). Prints the median ms and tokens/s per
checkpoint over --rounds and the ratio of its tokens/s to the first checkpoint's.

    python benchmarks/prefill_speed.py FLOAT32_DIR INT8_DIR INT4_DIR --context 1024 --rounds 8 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache.reserved import ReservedCache  # noqa: E402
from qwen_model.modeling_qwen import QWenLMHeadModel  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint directories, the first is the baseline")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [QWenLMHeadModel.from_pretrained(path).eval() for path in args.models]
    vocab = min(m.config.vocab_size for m in models)
    ids = torch.randint(100, vocab - 100, (1, args.context), generator=torch.Generator().manual_seed(0))
    times = [[] for _ in models]
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            for model, spent in zip(models, times):
                cache = ReservedCache(args.context + 1, model.config)
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                if round_:  # the first round is a warm-up (kernel builds, first-touch pages)
                    spent.append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.context}-token prompt, batch 1, median of "
          f"{args.rounds} rounds (checkpoints in turn within each round)")
    print("| checkpoint | prefill ms (median) | min ms | max ms | tokens/s | vs first |")
    print("|---|---|---|---|---|---|")
    for path, median, spent in zip(args.models, medians, times):
        print(f"| {path} | {median * 1e3:.1f} | {min(spent) * 1e3:.1f} | {max(spent) * 1e3:.1f} | "
              f"{args.context / median:.1f} | {medians[0] / median:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
