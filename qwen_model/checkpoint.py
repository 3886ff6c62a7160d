"""Checkpoint directories that load with `trust_remote_code=True`: our model files copied in, `auto_map` set."""
import json
import os
import shutil
from pathlib import Path

MODEL_CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


def _update_json(path: Path, updates: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_remote_code(out_dir, tokenizer_class: bool = True) -> None:
    """Copy the model's source files into `out_dir` and point `config.json` (and the tokenizer config) at them."""
    out_dir = Path(out_dir)
    here = Path(__file__).parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, out_dir / name)
    _update_json(out_dir / "config.json", {"auto_map": AUTO_MAP, "architectures": ["QWenLMHeadModel"],
                                          "model_type": "qwen"})
    if tokenizer_class and (out_dir / "qwen.tiktoken").exists():
        _update_json(out_dir / "tokenizer_config.json",
                     {"auto_map": TOKENIZER_AUTO_MAP, "tokenizer_class": "QWenTokenizer"})


def replace_dir_atomically(tmp_dir, out_dir) -> None:
    """Move a finished `tmp_dir` to `out_dir` (replacing an old one), so readers never see a half-written checkpoint."""
    out_dir = Path(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old-" + str(os.getpid()))
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old)
