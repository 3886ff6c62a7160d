"""`python -m quantize.gptq_int8 --model DIR --out OUT`: 8-bit GPTQ quantization of a Qwen checkpoint."""
import sys

from quantize.cli import main

if __name__ == "__main__":
    sys.exit(main(bits=8))
