"""Inference speed and peak memory of Qwen checkpoints, as the original Qwen release's speed/memory tables report them.

    python -m qwen_model.profile --model DIR [DIR ...] [--kv float int8 int4] [--context 1024 ...] [--generate 256]
                                 [--batch 1 ...] [--threads 2] [--device cpu|cuda] [--dtype auto|float32|...]

The original protocol (Qwen-7B's `profile.py`): greedy `generate()` of M new tokens after a context of N tokens,
forced to exactly M tokens (`min_length`), timed as a whole; "average generate speed" = M / that time, and the peak
GPU memory `torch.cuda.max_memory_allocated()` (weights included). Each row here times the same `generate()` call,
through the model's own cache path (the float `ReservedCache` `generate()` makes, or the `QuantizedKVCache` that `use_cache_quantization`
/ `cache_bits` select), and splits it with a stopping criterion that records when each token is appended: prefill =
up to the first new token (the forward over the context and the first sampling step), decode = the M - 1 after it.
Prefill and decode rates count every sequence of the batch; the averaged figure is per sequence, as the original.
Memory: on CUDA `max_memory_allocated()` over the timed run; on CPU the resident high-water mark (Linux VmHWM,
reset right before the timed run, with the default allocator a user runs with: a fixed glibc mmap threshold would make
resident memory follow live tensors, but its page faults double the time of a CPU prefill); and the
increase over what was allocated / resident once the model and the prompt were loaded.

Rows = models x KV caches x batch sizes x contexts, measured one after the other: on CPU each row in a fresh
subprocess (resident memory is per process); on CUDA one subprocess per model x cache (the peak counter is reset per
row). A warm-up `generate()` of 2 tokens on the same prompt runs first (one-time work such as kernel repacking or
Triton compiles is not timed). Prompts: the checkpoint's own tokenizer on calib_data/heldout_eval.txt, repeated to
fill the context (`--input text`, default), or seeded random ids (`--input random`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KV_SETTINGS = {"float": {"use_cache_quantization": False},
               "int8": {"use_cache_quantization": True, "cache_bits": 8},
               "int4": {"use_cache_quantization": True, "cache_bits": 4}}
DTYPES = {"auto": None, "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
INPUTS = ("text", "random")
TEXT_FILE = Path(__file__).resolve().parents[1] / "calib_data" / "heldout_eval.txt"
ROW_MARKER = "PROFILE_ROW "
MIB = 1 << 20


class ProfileError(ValueError):
    """Bad input or a row that cannot run; its message is the one line the CLI prints."""


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row of the table: which checkpoint with which cache, at which batch, context and generated length."""

    model: str
    kv: str
    batch: int
    context: int
    generate: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row shares: device, activation dtype, CPU threads, prompt kind, timed runs, warm-up."""

    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    input: str = "text"
    repeats: int = 1
    warmup: bool = True


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """Current resident set size (Linux VmRSS); falls back to the lifetime peak where /proc is missing."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_resident_bytes() -> int:
    """Resident high-water mark (Linux VmHWM, resettable with `reset_peak_resident`), else the lifetime peak."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_resident() -> bool:
    """Resets VmHWM to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def read_config(model_dir: str) -> dict:
    """config.json of a checkpoint directory, or a ProfileError saying what is missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ProfileError(f"model directory not found: {model_dir}")
    config = path / "config.json"
    if not config.is_file():
        raise ProfileError(f"{model_dir} has no config.json (not a checkpoint directory)")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ProfileError(f"{config}: not valid JSON ({e})") from None


def weights_label(config: dict, dtype: torch.dtype | None = None) -> str:
    """`int4 g128` for a GPTQ checkpoint, else the float dtype the model runs in."""
    qc = config.get("quantization_config")
    if qc:
        group = qc.get("group_size", -1)
        return f"int{qc['bits']} g{group}" if group and group > 0 else f"int{qc['bits']}"
    return str(dtype).replace("torch.", "") if dtype is not None else "float"


def validate(specs: list[RowSpec], settings: Settings) -> None:
    """Rejects what cannot run before any subprocess starts: one ProfileError with one clear sentence."""
    if settings.device not in ("cpu", "cuda") and not settings.device.startswith("cuda:"):
        raise ProfileError(f"--device must be cpu or cuda[:N], got {settings.device!r}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError(f"--device {settings.device}: CUDA is not available in this torch build or machine")
    if settings.dtype not in DTYPES:
        raise ProfileError(f"--dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    if settings.input not in INPUTS:
        raise ProfileError(f"--input must be one of {', '.join(INPUTS)}, got {settings.input!r}")
    if settings.threads is not None and settings.threads < 1:
        raise ProfileError(f"--threads must be a positive integer, got {settings.threads}")
    if settings.repeats < 1:
        raise ProfileError(f"--repeats must be a positive integer, got {settings.repeats}")
    for spec in specs:
        if spec.kv not in KV_SETTINGS:
            raise ProfileError(f"--kv must be among {', '.join(KV_SETTINGS)}, got {spec.kv!r}")
        for name in ("batch", "context", "generate"):
            if getattr(spec, name) < 1:
                raise ProfileError(f"--{name} must be a positive integer, got {getattr(spec, name)}")
        config = read_config(spec.model)
        max_pos = config.get("max_position_embeddings")
        if max_pos and spec.context + spec.generate > 4 * max_pos:
            raise ProfileError(f"--context + --generate = {spec.context + spec.generate} is beyond 4x the model's "
                               f"max_position_embeddings ({max_pos}) in {spec.model} (dynamic NTK stretches it "
                               "that far at most)")


def _load(spec: RowSpec, settings: Settings):
    from .modeling_qwen import QWenLMHeadModel

    flag = DTYPES[settings.dtype]
    kwargs = dict(KV_SETTINGS[spec.kv])
    if flag is not None:
        kwargs.update({"bf16": flag == "bf16", "fp16": flag == "fp16", "fp32": flag == "fp32"})
    if settings.device != "cpu":
        kwargs["device_map"] = settings.device
    model = QWenLMHeadModel.from_pretrained(spec.model, **kwargs).eval()
    with torch.inference_mode():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()  # fault in weights safetensors left memory-mapped, so they count as loaded, not as added
    return model


def prompt_ids(model_dir: str, batch: int, context: int, kind: str, vocab_size: int) -> torch.Tensor:
    """`batch` x `context` token ids: the checkpoint's own tokenizer on calib_data/heldout_eval.txt, repeated to fill
    the context, each sequence starting at a different token ("text"); or seeded uniform ids ("random")."""
    if kind == "random":
        return torch.randint(0, vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    from .tokenization_qwen import load_tokenizer

    ids = load_tokenizer(model_dir).encode(TEXT_FILE.read_text())
    need = context + batch
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor([ids[b:b + context] for b in range(batch)])


class _StepTimer:
    """A stopping criterion that never stops: it records when each new token has been appended."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids: torch.Tensor, new_tokens: int, timer: _StepTimer | None = None) -> torch.Tensor:
    from transformers import GenerationConfig, StoppingCriteriaList

    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad)
    criteria = StoppingCriteriaList([timer] if timer is not None else [])
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                          stopping_criteria=criteria)


def _memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes()


def measure_row(model, spec: RowSpec, settings: Settings) -> dict:
    """Times `settings.repeats` generate() calls of one row on a loaded model; returns the row's figures.

    The memory baseline ("loaded") is taken once the model and the prompt are in memory, before the warm-up."""
    device = next(model.parameters()).device
    ids = prompt_ids(spec.model, spec.batch, spec.context, settings.input, model.config.vocab_size).to(device)
    loaded_bytes = _memory_now(device)
    with torch.inference_mode():
        if settings.warmup:
            _generate(model, ids, min(2, spec.generate))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        peak_reset = device.type == "cuda" or reset_peak_resident()
        prefill = decode = total = 0.0
        for _ in range(settings.repeats):
            timer = _StepTimer(device)
            start = time.perf_counter()
            out = _generate(model, ids, spec.generate, timer)
            if out.shape != (spec.batch, spec.context + spec.generate) or len(timer.times) != spec.generate:
                raise ProfileError(f"generate() returned {tuple(out.shape)} after {len(timer.times)} steps, expected "
                                   f"({spec.batch}, {spec.context + spec.generate}) after {spec.generate}")
            prefill += timer.times[0] - start
            decode += timer.times[-1] - timer.times[0]
            total += timer.times[-1] - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident_bytes()
    runs = settings.repeats
    dtype = str(model.transformer.ln_f.weight.dtype).removeprefix("torch.")
    return {
        **dataclasses.asdict(spec),
        "weights": weights_label(model.config.to_dict(), dtype), "dtype": dtype, "device": device.type,
        "threads": torch.get_num_threads(), "input": settings.input, "repeats": runs, "warmup": settings.warmup,
        "prefill_s": prefill / runs, "decode_s": decode / runs, "total_s": total / runs,
        "prefill_tokens_per_s": runs * spec.batch * spec.context / prefill,
        "decode_tokens_per_s": runs * spec.batch * (spec.generate - 1) / decode if spec.generate > 1 else None,
        "average_tokens_per_s": runs * spec.generate / total,
        "memory": "peak allocated" if device.type == "cuda" else "peak RSS",
        "peak_memory_mib": peak / MIB, "added_memory_mib": (peak - loaded_bytes) / MIB,
        "peak_reset": peak_reset,
    }


def run_rows(specs: list[RowSpec], settings: Settings) -> list[dict]:
    """Measures rows in this process, loading each distinct (model, kv) once. Used by each profiler subprocess."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    rows, loaded = [], {}
    for spec in specs:
        key = (spec.model, spec.kv)
        if key not in loaded:
            loaded.clear()
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()
            loaded[key] = _load(spec, settings)
        try:
            rows.append(measure_row(loaded[key], spec, settings))
        except (torch.OutOfMemoryError, MemoryError):
            raise ProfileError(f"{spec.model} with the {spec.kv} cache at batch {spec.batch}, context "
                               f"{spec.context} + {spec.generate} does not fit in {settings.device} memory") from None
    return rows


def _groups(specs: list[RowSpec], device: str) -> list[list[RowSpec]]:
    """One subprocess per row on CPU (resident memory is per process); per (model, kv) on CUDA."""
    if not device.startswith("cuda"):
        return [[s] for s in specs]
    groups: dict[tuple, list[RowSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.model, spec.kv), []).append(spec)
    return list(groups.values())


def profile(specs: list[RowSpec], settings: Settings, progress: bool = True) -> list[dict]:
    """Measures every row, each group in a fresh `python -m qwen_model.profile --child` process, in order."""
    from tqdm import tqdm

    validate(specs, settings)
    env = dict(os.environ)
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    rows = []
    repo = Path(__file__).resolve().parents[1]
    with tqdm(total=len(specs), desc="profile", unit="row", disable=not progress) as bar:
        for group in _groups(specs, settings.device):
            bar.set_postfix_str(f"{Path(group[0].model).name} kv={group[0].kv}")
            payload = json.dumps({"settings": dataclasses.asdict(settings),
                                  "rows": [dataclasses.asdict(s) for s in group]})
            result = subprocess.run([sys.executable, "-m", "qwen_model.profile", "--child", payload],
                                    capture_output=True, text=True, env=env, cwd=repo)
            if result.returncode != 0:
                lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
                raise ProfileError(lines[-1].removeprefix("error: ") if lines else
                                   f"profiler subprocess exited with status {result.returncode}")
            for line in result.stdout.splitlines():
                if line.startswith(ROW_MARKER):
                    rows.append(json.loads(line[len(ROW_MARKER):]))
                    bar.update(1)
    return rows


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_table(rows: list[dict]) -> str:
    """Markdown table, one line per row; ratios are against the first row of the same batch and context."""
    gib = max(r["peak_memory_mib"] for r in rows) >= 4096
    unit, scale = ("GiB", 1024) if gib else ("MiB", 1)
    first = {}
    for r in rows:
        first.setdefault((r["batch"], r["context"], r["generate"]), r)
    head = (f"| model | weights | KV cache | batch | context | new tokens | prefill tok/s | decode tok/s | "
            f"average tok/s | decode vs first | {rows[0]['memory']} {unit} | added {unit} |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        base = first[(r["batch"], r["context"], r["generate"])]
        ratio = (r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                 if r["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)
        out.append(f"| {Path(r['model']).name} | {r['weights']} | {r['kv']} | {r['batch']} | {r['context']} | "
                   f"{r['generate']} | {_fmt(r['prefill_tokens_per_s'], 1)} | {_fmt(r['decode_tokens_per_s'])} | "
                   f"{_fmt(r['average_tokens_per_s'])} | {_fmt(ratio)}x | {r['peak_memory_mib'] / scale:.{3 if gib else 0}f} | "
                   f"{r['added_memory_mib'] / scale:.{3 if gib else 0}f} |")
    r0 = rows[0]
    out.append(f"\n{r0['device']}, {r0['threads']} threads, activations {r0['dtype']}, prompt: "
               f"{'the checkpoint tokenizer on calib_data/heldout_eval.txt' if r0['input'] == 'text' else 'random ids'}"
               f", greedy generate(), {r0['repeats']} timed run(s) per row after "
               f"{'a warm-up' if r0['warmup'] else 'no warm-up'}. Prefill/decode tok/s count all sequences (decode: "
               "the tokens after the first); average = new tokens per sequence / whole generate() time (the "
               "original's figure); decode vs first: against the first row of the same batch and context.")
    return "\n".join(out)


def _child(payload: str) -> int:
    data = json.loads(payload)
    settings = Settings(**data["settings"])
    try:
        rows = run_rows([RowSpec(**r) for r in data["rows"]], settings)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(ROW_MARKER + json.dumps(row), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_model.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", help="checkpoint directories (float or GPTQ), one row group each")
    parser.add_argument("--kv", nargs="+", default=["float"], metavar="{" + ",".join(KV_SETTINGS) + "}",
                        help="KV caches: float, int8 (per token), int4 (4-bit); default float")
    parser.add_argument("--context", nargs="+", type=int, default=[1024], help="context tokens (default 1024)")
    parser.add_argument("--generate", type=int, default=256, help="new tokens per sequence (default 256)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help=f"activations: {', '.join(DTYPES)} (default auto: the "
                        "checkpoint's flags, else float32 on CPU and bf16 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (and OMP_NUM_THREADS) in each row's process")
    parser.add_argument("--input", default="text", help="text (the real tokenizer) or random ids (default text)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generate() calls per row (default 1)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one short untimed generate() before timing each row (default on)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    if not args.model:
        parser.error("--model is required")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    specs = [RowSpec(m, kv, b, c, args.generate) for m in args.model for kv in args.kv for b in args.batch
             for c in args.context]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(device=device, dtype=args.dtype, threads=args.threads, input=args.input,
                        repeats=args.repeats, warmup=args.warmup)
    try:
        rows = profile(specs, settings)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = render_table(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
