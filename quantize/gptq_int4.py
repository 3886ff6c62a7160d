"""`python -m quantize.gptq_int4 --model DIR --out OUT`: 4-bit GPTQ quantization of a Qwen checkpoint."""
import sys

from quantize.cli import main

if __name__ == "__main__":
    sys.exit(main(bits=4))
