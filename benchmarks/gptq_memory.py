"""Peak memory of block-by-block GPTQ quantization as the number of decoder blocks grows.

Writes a Qwen-7B-shaped checkpoint with seeded random weights (bf16, one safetensors shard per block, the Qwen
tokenizer), block by block so the writer stays small, and a view of its first N blocks for each N asked for (the
shards are symlinked, not copied). Each view is quantized by the CLI (`python -m quantize.gptq_int4`) in a fresh
process whose memory is watched from outside:

- peak RSS: the kernel's high-water mark (`ru_maxrss` from wait4), anonymous plus file-backed pages;
- peak anonymous / file-backed RSS: `RssAnon` / `RssFile` of /proc/PID/status, sampled every `--interval` s.

File-backed pages are safetensors pages the process still maps (clean, reclaimable, but counted in RSS, `top` and
the cgroup); anonymous pages are what the process allocated. If only one block is held at a time, neither grows
with the number of blocks.

    python benchmarks/gptq_memory.py --blocks 4,8 --nsamples 4 --seqlen 256 --methods gptq,rtn
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_model.configuration_qwen import QWenConfig  # noqa: E402
from qwen_model.tokenization_qwen import QWenTokenizer  # noqa: E402

QWEN_7B = dict(hidden_size=4096, num_attention_heads=32, kv_channels=128, intermediate_size=22016,
               vocab_size=151936)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
GiB = 1 << 30


def block_shapes(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one Qwen v1 decoder block, names relative to `transformer.h.{i}.`."""
    ff = intermediate_size // 2
    return {
        "ln_1.weight": (hidden_size,),
        "attn.c_attn.weight": (3 * hidden_size, hidden_size),
        "attn.c_attn.bias": (3 * hidden_size,),
        "attn.c_proj.weight": (hidden_size, hidden_size),
        "ln_2.weight": (hidden_size,),
        "mlp.w1.weight": (ff, hidden_size),
        "mlp.w2.weight": (ff, hidden_size),
        "mlp.c_proj.weight": (hidden_size, ff),
    }


def block_bytes(hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> int:
    """Bytes of one decoder block's parameters stored in `dtype`."""
    numel = sum(torch.Size(s).numel() for s in block_shapes(hidden_size, intermediate_size).values())
    return numel * torch.empty(0, dtype=dtype).element_size()


def _random(shape, gen: torch.Generator, dtype: torch.dtype, std: float, rows_per_chunk: int = 8192):
    """normal(0, std) in `dtype`, drawn in row chunks so a float32 copy of a large matrix never exists."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1)
    for start in range(0, shape[0], rows_per_chunk):
        rows = flat[start:start + rows_per_chunk]
        rows.copy_(torch.randn(rows.shape, generator=gen) * std)
    return out


def _block_tensors(layer: int, shapes: dict, gen: torch.Generator, dtype: torch.dtype, std: float) -> dict:
    tensors = {}
    for name, shape in shapes.items():
        key = f"transformer.h.{layer}.{name}"
        tensors[key] = torch.ones(shape, dtype=dtype) if name.startswith("ln_") else _random(shape, gen, dtype, std)
    return tensors


def _write_config_and_tokenizer(out_dir: Path, num_layers: int, dims: dict, dtype_name: str) -> None:
    flags = {name: name == dtype_name for name in DTYPES}
    QWenConfig(num_hidden_layers=num_layers, use_flash_attn=False, **dims, **flags).save_pretrained(out_dir)
    QWenTokenizer().save_pretrained(out_dir)


def _write_index(out_dir: Path, weight_map: dict, total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_random_checkpoint(out_dir, num_layers: int, hidden_size: int, num_attention_heads: int, kv_channels: int,
                            intermediate_size: int, vocab_size: int, dtype: str = "bf16", seed: int = 0,
                            std: float = 0.02) -> Path:
    """A sharded Qwen v1 checkpoint with normal(0, std) weights (norms = 1), written one block at a time.

    Shards: `model-00001` holds the embedding, one shard per block follows, the last holds ln_f and lm_head.
    Block i draws from a generator seeded with (seed, i), so the first N blocks do not depend on `num_layers`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    dims = dict(hidden_size=hidden_size, num_attention_heads=num_attention_heads, kv_channels=kv_channels,
                intermediate_size=intermediate_size, vocab_size=vocab_size)
    _write_config_and_tokenizer(out_dir, num_layers, dims, dtype)
    num_shards = num_layers + 2
    weight_map, total = {}, 0

    def write(number: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    head_gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    write(1, {"transformer.wte.weight": _random((vocab_size, hidden_size), head_gen, torch_dtype, std)})
    shapes = block_shapes(hidden_size, intermediate_size)
    for layer in range(num_layers):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        write(layer + 2, _block_tensors(layer, shapes, gen, torch_dtype, std))
    write(num_shards, {"transformer.ln_f.weight": torch.ones(hidden_size, dtype=torch_dtype),
                       "lm_head.weight": _random((vocab_size, hidden_size), head_gen, torch_dtype, std)})
    _write_index(out_dir, weight_map, total)
    return out_dir


def first_blocks_view(src_dir, out_dir, num_layers: int) -> Path:
    """A checkpoint made of the first `num_layers` blocks of `src_dir` (plus its embedding and head), shards linked."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = json.loads((src_dir / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}")
    weight_map = json.loads((src_dir / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {k: v for k, v in weight_map.items()
            if not k.startswith("transformer.h.") or int(k.split(".")[2]) < num_layers}
    out_dir.mkdir(parents=True, exist_ok=False)
    for name in sorted(set(kept.values())):
        (out_dir / name).symlink_to((src_dir / name).resolve())
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        if (src_dir / name).exists():
            shutil.copyfile(src_dir / name, out_dir / name)
    config["num_hidden_layers"] = num_layers
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = 0
    for name in sorted(set(kept.values())):
        with safe_open(str(out_dir / name), framework="pt") as handle:
            for key in handle.keys():
                if key in kept:
                    piece = handle.get_slice(key)
                    total += torch.Size(piece.get_shape()).numel() * SAFETENSORS_ITEMSIZE[piece.get_dtype()]
    _write_index(out_dir, kept, total)
    return out_dir


def checkpoint_bytes(model_dir) -> int:
    """`total_size` recorded in the checkpoint's index (tensor bytes, headers excluded)."""
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


@dataclass
class RunMemory:
    """Memory and time of one finished child process (bytes and seconds)."""

    peak_rss: int
    peak_anon: int
    peak_file: int
    wall_s: float
    cpu_s: float


def _rss_fields(pid: int) -> tuple[int, int] | None:
    """(RssAnon, RssFile) of a running process in bytes, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("RssAnon", "RssFile")))
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024
    except (OSError, KeyError):
        return None


def run_measured(cmd: list[str], log_path, cwd=REPO, env: dict | None = None, interval: float = 0.01) -> RunMemory:
    """Run `cmd` (output to `log_path`), sampling its RSS until it exits; RuntimeError with the log tail on failure."""
    start = time.perf_counter()
    peak_anon = peak_file = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sample = _rss_fields(proc.pid)
            if sample:
                peak_anon, peak_file = max(peak_anon, sample[0]), max(peak_file, sample[1])
            time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return RunMemory(peak_rss=usage.ru_maxrss * 1024, peak_anon=peak_anon, peak_file=peak_file, wall_s=wall,
                     cpu_s=usage.ru_utime + usage.ru_stime)


def quantize_command(model_dir, out_dir, nsamples: int, seqlen: int, method: str = "gptq", calib=None,
                     batch_size: int | None = None) -> list[str]:
    """The 4-bit CLI on CPU, quiet, for one checkpoint."""
    cmd = [sys.executable, "-m", "quantize.gptq_int4", "--model", str(model_dir), "--out", str(out_dir),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--method", method, "--device", "cpu", "-q"]
    if calib is not None:
        cmd += ["--calib", str(calib)]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def measure_blocks(full_dir, work_dir, blocks: list[int], methods: list[str], nsamples: int, seqlen: int,
                   calib=None, threads: int = 2) -> list[tuple[int, str, int, RunMemory]]:
    """Quantize a view of the first N blocks for each N and method, one fresh process each; outputs are deleted."""
    rows = []
    work_dir = Path(work_dir)
    for n in blocks:
        view = first_blocks_view(full_dir, work_dir / f"view-{n}", n)
        for method in methods:
            out = work_dir / f"out-{n}-{method}"
            mem = run_measured(quantize_command(view, out, nsamples, seqlen, method, calib),
                               work_dir / f"log-{n}-{method}.txt", env=child_env(threads))
            shutil.rmtree(out)
            rows.append((n, method, checkpoint_bytes(view), mem))
        shutil.rmtree(view)
    return rows


def _gb(value: int) -> str:
    return f"{value / GiB:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="4,8", help="comma-separated block counts (default 4,8)")
    p.add_argument("--methods", default="gptq,rtn", help="comma-separated: gptq, rtn (default both)")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib", default=None, help="calibration source (default: the bundled conversations)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="stored weights and config flag")
    p.add_argument("--hidden", type=int, default=QWEN_7B["hidden_size"])
    p.add_argument("--heads", type=int, default=QWEN_7B["num_attention_heads"])
    p.add_argument("--kv-channels", type=int, default=QWEN_7B["kv_channels"])
    p.add_argument("--intermediate", type=int, default=QWEN_7B["intermediate_size"])
    p.add_argument("--vocab", type=int, default=QWEN_7B["vocab_size"])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the quantizing process")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a new temp dir, removed)")
    args = p.parse_args()

    blocks = sorted({int(b) for b in args.blocks.split(",")})
    methods = args.methods.split(",")
    dims = dict(hidden_size=args.hidden, num_attention_heads=args.heads, kv_channels=args.kv_channels,
                intermediate_size=args.intermediate, vocab_size=args.vocab)
    one_block = block_bytes(args.hidden, args.intermediate, DTYPES[args.dtype])
    need = max(blocks) * one_block + 2 * args.vocab * args.hidden * DTYPES[args.dtype].itemsize
    work = Path(tempfile.mkdtemp(prefix="gptq_memory-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if free < 2.2 * need:  # the checkpoint plus one quantized output (embedding and head are copied)
        shutil.rmtree(work)
        raise SystemExit(f"need about {_gb(int(2.2 * need))} GiB free under {work.parent}, have {_gb(free)} GiB")
    try:
        t0 = time.perf_counter()
        full = write_random_checkpoint(work / "full", max(blocks), dtype=args.dtype, **dims)
        write_s = time.perf_counter() - t0
        rows = measure_blocks(full, work, blocks, methods, args.nsamples, args.seqlen, args.calib, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, child threads {args.threads}; hidden {args.hidden}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, {args.dtype}; one block = {_gb(one_block)} GiB; "
          f"calibration {args.calib or 'bundled'} x{args.nsamples}, seqlen {args.seqlen}; checkpoint written in "
          f"{write_s:.0f}s\n")
    print("| blocks | method | checkpoint (GiB) | peak RSS (GiB) | peak anon RSS (GiB) | peak file RSS (GiB) "
          "| wall (s) | CPU (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, method, size, mem in rows:
        print(f"| {n} | {method} | {_gb(size)} | {_gb(mem.peak_rss)} | {_gb(mem.peak_anon)} | {_gb(mem.peak_file)} "
              f"| {mem.wall_s:.0f} | {mem.cpu_s:.0f} |")
    print()
    for method in methods:
        by_n = {n: mem for n, m, _, mem in rows if m == method}
        lo, hi = min(by_n), max(by_n)
        if lo == hi:
            continue
        for label, attr in (("peak RSS", "peak_rss"), ("peak anon RSS", "peak_anon"), ("peak file RSS", "peak_file")):
            diff = getattr(by_n[hi], attr) - getattr(by_n[lo], attr)
            print(f"{method}: {label} {hi} vs {lo} blocks: {diff / GiB:+.2f} GiB = {diff / one_block:+.2f} blocks "
                  f"({diff / one_block / (hi - lo):+.2f} per added block)")


if __name__ == "__main__":
    main()
