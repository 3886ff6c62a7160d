"""WikiText-2 perplexity of SmolLM2-135M (Qwen v1 layout, or with --native its own Llama layout) quantized by our
GPTQ and by round-to-nearest.

Protocol of ../shared/data/PEER_RESULTS.md: calibration = the 128 x 512 C4 token ids of
calib_c4_smollm2_128x512.json; perplexity = wiki.test.raw, ctx 512, first 16 windows, NLL summed in float64.
The peer's figures (GPTQModel 7.6.0, same samples, same protocol) are quoted from that file; our RTN column
reproduces its RTN column in this harness first.

    python benchmarks/gptq_quality.py [--model DIR | --native] [--settings int8-g128 int4-g128 int4-g64 int3-g64]

--calib-orders 0 1 2 3 repeats each GPTQ run with the same 128 samples in other (seeded) orders: mathematically the
same calibration, but every float32 sum over samples runs in another order, so the spread of these runs is the
solver's float-rounding noise (a figure one layout or thread count gives is only comparable within that spread).
"""
import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from calib_data.tokenization import encode_text  # noqa: E402
from benchmarks.smollm2_llama import convert as convert_native  # noqa: E402
from qwen_model.tokenization_qwen import load_tokenizer  # noqa: E402
from quantize.evaluate import perplexity  # noqa: E402
from quantize.model_families import family_for  # noqa: E402
from quantize.native_checkpoint import load_model  # noqa: E402
from quantize.quantize_model import QuantizeSettings, quantize_checkpoint  # noqa: E402
from quantize.quantizer import rtn_quantize  # noqa: E402

SETTINGS = {"int8-g128": (8, 128), "int4-g128": (4, 128), "int4-g64": (4, 64), "int3-g64": (3, 64)}
# ../shared/data/PEER_RESULTS.md: (RTN, GPTQModel defaults, GPTQModel wall time in s)
PEER = {"int8-g128": (36.246, 36.107, 514), "int4-g128": (55.626, 53.458, 548), "int4-g64": (52.553, 49.303, 540),
        "int3-g64": (248.265, 103.976, 546)}
FLOAT_PPL = 36.003
CALIB = SHARED / "data" / "calib_c4_smollm2_128x512.json"


def calibration_in_order(seed: int, work: Path) -> Path:
    """The peer's calibration file (seed 0), or its samples shuffled with `seed` into a file under `work`."""
    if seed == 0:
        return CALIB
    path = work / f"calib-order-{seed}.json"
    if not path.exists():  # written once, reused by every setting
        samples = json.loads(CALIB.read_text())
        random.Random(seed).shuffle(samples)
        path.write_text(json.dumps(samples))
    return path


def wiki_ids(model_dir):
    text = (SHARED / "data" / "wiki.test.raw").read_text(encoding="utf-8")
    return encode_text(load_tokenizer(model_dir), text)


def ppl(model_dir, ids):
    model = load_model(model_dir)
    with torch.no_grad():
        return perplexity(model, ids, ctx=512, n_windows=16, progress=False)


def rtn_fake_quant_ppl(model_dir, ids, bits, group_size):
    """The peer file's RTN protocol: every block linear replaced in memory by its RTN weight (float32 scales)."""
    model = load_model(model_dir)
    family = family_for(model_dir)
    for block in family.base_model(model)[1]:
        for name in family.linears:
            linear = block.get_submodule(name)
            linear.weight.data = rtn_quantize(linear.weight.data, bits, group_size, sym=True).weight
    with torch.no_grad():
        return perplexity(model, ids, ctx=512, n_windows=16, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SmolLM2 checkpoint dir (default: convert it into a temp dir)")
    p.add_argument("--native", action="store_true", help="convert to the native Llama layout instead of Qwen v1")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--no-group-aware", action="store_true")
    p.add_argument("--no-scale-search", action="store_true", help="plain min/max group grids (the reference's)")
    p.add_argument("--skip-rtn", action="store_true", help="skip the in-memory RTN baseline")
    p.add_argument("--rtn-checkpoint", action="store_true",
                   help="also write an RTN checkpoint (float16 scales, as the format stores them) and score it")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--calib-orders", type=int, nargs="+", default=[0], metavar="SEED",
                   help="run GPTQ once per sample order (0 = the file's order; others shuffle it with that seed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(args.model) if args.model else Path(work) / "smollm2"
        if not args.model and args.native:
            convert_native(model_dir)
        elif not args.model:
            subprocess.run([sys.executable, str(SHARED / "tools" / "smollm2_to_qwen.py"), str(model_dir)],
                           check=True, capture_output=True)
        ids = wiki_ids(model_dir)
        base = ppl(model_dir, ids)
        print(f"float32: {base:.3f} (PEER_RESULTS: {FLOAT_PPL})", flush=True)
        rows = []
        for name in args.settings:
            bits, gs = SETTINGS[name]
            row = {"setting": name}
            if not args.skip_rtn:
                row["rtn"] = rtn_fake_quant_ppl(model_dir, ids, bits, gs)
                print(f"{name} rtn (in memory, fp32 scales): ppl {row['rtn']:.3f}", flush=True)
            if args.rtn_checkpoint:
                out = Path(work) / f"{name}-rtn"
                settings = QuantizeSettings(bits=bits, group_size=gs, damp_percent=args.damp, method="rtn")
                quantize_checkpoint(model_dir, out, settings, device="cpu")
                row["rtn_ckpt"] = ppl(out, ids)
                print(f"{name} rtn checkpoint: ppl {row['rtn_ckpt']:.3f}", flush=True)
            row["runs"] = []
            for seed in args.calib_orders:
                out = Path(work) / f"{name}-gptq-{seed}"
                settings = QuantizeSettings(bits=bits, group_size=gs, damp_percent=args.damp, method="gptq",
                                            act_group_aware=not args.no_group_aware,
                                            scale_search=not args.no_scale_search)
                t0, c0 = time.time(), time.process_time()
                quantize_checkpoint(model_dir, out, settings, calib=str(calibration_in_order(seed, Path(work))),
                                    nsamples=128, seqlen=512, device="cpu")
                wall, cpu = time.time() - t0, time.process_time() - c0
                score = ppl(out, ids)
                row["runs"].append((seed, score, wall, cpu))
                shutil.rmtree(out)
                print(f"{name} gptq checkpoint, calibration order {seed}: ppl {score:.3f}, "
                      f"quantized in {wall:.0f}s wall, {cpu:.0f}s CPU", flush=True)
            rows.append(row)
    print(f"\nfloat32 baseline (16 windows): {base:.3f}\n")
    print("| setting | RTN, our harness | RTN, peer file | RTN checkpoint (fp16 scales) | GPTQ (ours, defaults) "
          "| GPTQModel, peer file | ours vs peer | our wall / CPU time | peer wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        peer_rtn, peer_gptq, peer_s = PEER[r["setting"]]
        for seed, gptq, wall, cpu in r["runs"]:
            label = f"{r['setting']}" + (f" (order {seed})" if seed else "")
            print(f"| {label} | {r.get('rtn', nan):.3f} | {peer_rtn:.3f} | {r.get('rtn_ckpt', nan):.3f} | "
                  f"{gptq:.3f} | {peer_gptq:.3f} | {(gptq / peer_gptq - 1) * 100:+.2f}% | "
                  f"{wall:.0f} s / {cpu:.0f} s | {peer_s} s |")
    if len(args.calib_orders) > 1:
        print("\n| setting | sample orders | GPTQ mean | min | max | spread (max/min - 1) |\n|---|---|---|---|---|---|")
        for r in rows:
            values = [run[1] for run in r["runs"]]
            print(f"| {r['setting']} | {len(values)} | {statistics.mean(values):.3f} | {min(values):.3f} | "
                  f"{max(values):.3f} | {(max(values) / min(values) - 1) * 100:.2f}% |")


if __name__ == "__main__":
    main()
