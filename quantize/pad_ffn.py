"""`python -m quantize.pad_ffn SRC --out OUT [--ffn-multiple 1024]`: pad the FFN of an existing GPTQ checkpoint (ours,
or e.g. the official Qwen-7B-Chat-Int4) with exact zeros so vLLM can shard it at tensor-parallel 1/2/4/8."""
import argparse
import logging
import sys

from quantize.cli import Stopped, failure_status, print_vllm_support, report_stop, stop_on_signals
from quantize.ffn_padding import pad_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.pad_ffn", description=__doc__)
    p.add_argument("src", help="GPTQ checkpoint directory to read")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--ffn-multiple", type=int, default=1024, metavar="N",
                   help="pad the FFN width up to a multiple of N (default 1024: 11008 -> 11264, 13696 -> 14336)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        with stop_on_signals():
            out = pad_checkpoint(args.src, args.out, args.ffn_multiple, overwrite=args.overwrite)
    except Stopped as e:
        return report_stop(e.signum)
    except Exception as e:
        return failure_status(e, (OSError, ValueError, KeyError))
    print(f"wrote padded GPTQ checkpoint to {out}")
    print_vllm_support(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
