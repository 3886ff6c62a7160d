"""Cross-loading with the peer library GPTQModel on the real SmolLM2-135M model, scored by WikiText-2 perplexity.

1. Ours: `python -m quantize.gptq_int4` on the Qwen-layout model, loaded (a) by `qwen_model` and (b) through
   transformers' GPTQ integration (`gptq_backend="hf"`: optimum + GPTQModel kernels).
2. Peer: GPTQModel quantizes the same weights in the Llama layout (benchmarks/peer_llama_layout.py) with the same
   calibration samples and settings; its checkpoint is re-laid out to Qwen v1 and loaded (c) by `qwen_model`,
   and (d) run by GPTQModel itself (float16, its torch kernel; its CPU int4 kernel needs bf16).

Perplexity protocol of ../shared/data/README.md: wiki.test.raw, ctx 512, the first N windows (float32 baseline
36.003 for 16 windows); calibration: the first --nsamples of calib_c4_smollm2_128x512.json.

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/peer_gptqmodel_smollm2.py --work /tmp/peer_smollm2 --nsamples 32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.peer_llama_layout import convert_llama_gptq_to_qwen, convert_qwen_to_llama  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CONVERTER = REPO.parent / "shared" / "tools" / "smollm2_to_qwen.py"
logger = logging.getLogger(__name__)



def wiki_ids(model_dir: Path) -> list[int]:
    from qwen_model.tokenization_qwen import load_tokenizer

    tok = load_tokenizer(model_dir)
    return tok((DATA / "wiki.test.raw").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]


def quantize_ours(src: Path, out: Path, calib: Path, args) -> float:
    from quantize.cli import main as cli

    start = time.perf_counter()
    rc = cli(args.bits, ["--model", str(src), "--out", str(out), "--calib", str(calib), "--nsamples",
                         str(args.nsamples), "--seqlen", "512", "--group-size", str(args.group_size), "--damp",
                         str(args.damp), "--device", "cpu", "--overwrite", "-q"])
    if rc != 0:
        raise SystemExit(f"our CLI failed with exit code {rc}")
    return time.perf_counter() - start


def quantize_peer(src: Path, work: Path, samples: list[list[int]], args) -> tuple[Path, float]:
    from gptqmodel import GPTQModel, QuantizeConfig

    llama = convert_qwen_to_llama(src, work / "llama")
    calib = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
             for s in samples]
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False,
                          act_group_aware=True, damp_percent=args.damp, offload_to_disk=False)
    start = time.perf_counter()
    with contextlib.chdir(work):
        model = GPTQModel.load(str(llama), qcfg, device="cpu", dtype=torch.float32)
        model.quantize(calib)
        model.save(str(work / "llama-gptq"))
    return work / "llama-gptq", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working directory (created)")
    parser.add_argument("--model", default=None, help="Qwen-layout SmolLM2 dir (default: converted into --work)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    torch.set_num_threads(args.threads)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.model) if args.model else work / "smollm2"
    if not src.exists():
        subprocess.run([sys.executable, str(CONVERTER), str(src)], check=True)
    samples = json.loads((DATA / "calib_c4_smollm2_128x512.json").read_text())[:args.nsamples]
    calib = work / "calib.json"
    calib.write_text(json.dumps(samples))

    from transformers import AutoModelForCausalLM, GPTQConfig

    from qwen_model.modeling_qwen import QWenLMHeadModel
    from quantize.evaluate import perplexity

    ids = wiki_ids(src)
    rows = []

    def score(label, model):
        start = time.perf_counter()
        ppl = perplexity(model, ids, ctx=512, n_windows=args.windows, progress=False)
        rows.append((label, ppl, time.perf_counter() - start))
        print(f"{label}: {ppl:.3f}", flush=True)

    score("float32 (qwen_model)", QWenLMHeadModel.from_pretrained(src))
    ours_dir = work / "ours-gptq"
    ours_s = quantize_ours(src, ours_dir, calib, args)
    score("ours, loaded by qwen_model", QWenLMHeadModel.from_pretrained(ours_dir))
    hf = AutoModelForCausalLM.from_pretrained(ours_dir, trust_remote_code=True, gptq_backend="hf",
                                              quantization_config=GPTQConfig(bits=args.bits, backend="gptq_torch"))
    score("ours, loaded by transformers + optimum/GPTQModel (float32)", hf)
    del hf

    peer_dir, peer_s = quantize_peer(src, work, samples, args)
    peer_qwen = convert_llama_gptq_to_qwen(peer_dir, work / "peer-gptq-qwen")
    score("GPTQModel, loaded by qwen_model", QWenLMHeadModel.from_pretrained(peer_qwen))
    from gptqmodel import GPTQModel

    peer = GPTQModel.load(str(peer_dir), device="cpu", backend="gptq_torch", dtype=torch.float16)
    score("GPTQModel, its own inference (float16)", peer.model)

    print(f"\nint{args.bits} g{args.group_size} sym, damp {args.damp}, group-aware order, {args.nsamples} C4 "
          f"samples x 512; WikiText-2 ctx 512, first {args.windows} windows; {args.threads} threads")
    print(f"quantization wall time: ours {ours_s:.0f} s, GPTQModel {peer_s:.0f} s\n")
    print("| model | perplexity | scoring wall (s) |")
    print("|---|---|---|")
    for label, ppl, secs in rows:
        print(f"| {label} | {ppl:.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
