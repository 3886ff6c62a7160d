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


def make_readable(directory) -> None:
    """Files 0644 and the directory 0755, as `save_pretrained` output normally is: safetensors (0.8) writes through a
    private temporary file, so its shards would be 0600 and a server running as another user could not read them."""
    directory = Path(directory)
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def replace_dir_atomically(tmp_dir, out_dir) -> None:
    """Move a finished `tmp_dir` to `out_dir` (replacing an old one), so readers never see a half-written checkpoint.

    Its files are made readable by everyone first (`make_readable`)."""
    out_dir = Path(out_dir)
    make_readable(tmp_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old-" + str(os.getpid()))
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old)


def holds_safetensors(path) -> bool:
    """Whether `path` holds weights that `LazyCheckpoint` reads."""
    path = Path(path)
    return (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))


def harmless_extra(name: str, tensor, model) -> str | None:
    """Why a checkpoint tensor that `model` has no slot for can be skipped, or None if it cannot.

    Skipped: `rotary_emb.inv_freq` (recomputed from the config; vLLM skips it too) and an all-zero bias of a layer
    built without one (some exporters write zeros for every layer)."""
    if name.endswith("rotary_emb.inv_freq"):
        return "the rotary frequencies are computed from the config"
    if name.endswith(".bias") and tensor is not None and not bool(tensor.any()):
        try:
            layer = model.get_submodule(name[: -len(".bias")])
        except AttributeError:
            return None
        if getattr(layer, "bias", "none") is None:
            return "an all-zero bias of a layer without bias"
    return None


def describe_names(names) -> str:
    """A few names and the count, for one-line errors."""
    names = sorted(names)
    shown = ", ".join(names[:6])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


class LazyCheckpoint:
    """Tensors of a safetensors checkpoint directory (single file or sharded with an index), read on demand.

    No file stays open between reads: a mapping held for the whole run would keep every block read so far in the
    process's resident memory (as file-backed pages).
    """

    def __init__(self, path):
        from safetensors import safe_open

        self.path = path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        index = path / "model.safetensors.index.json"
        singles = sorted(p.name for p in path.glob("*.safetensors"))
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif "model.safetensors" in singles or len(singles) == 1:  # one file: any name (gptq_model-4bit-128g, ...)
            files = ["model.safetensors"] if "model.safetensors" in singles else singles
        else:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = f" (found {bins[0]}: convert it to safetensors; pickle files are not loaded)" if bins else ""
            hint = f" (found {len(singles)} safetensors files and no index)" if singles else hint
            raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json{hint}")
        self._where = {}
        for name in files:
            with safe_open(str(path / name), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = name

    def keys(self):
        return list(self._where)

    def _read(self, names, device):
        from safetensors import safe_open

        missing = [n for n in names if n not in self._where]
        if missing:
            raise KeyError(f"tensor {missing[0]!r} is not in the checkpoint")
        out = {}
        for file in sorted({self._where[n] for n in names}):
            with safe_open(str(self.path / file), framework="pt") as handle:
                for n in names:
                    if self._where[n] == file:
                        out[n] = handle.get_tensor(n).to(device)
        return out

    def get(self, name, device="cpu"):
        return self._read([name], device)[name]

    def state_dict(self, prefix: str, device="cpu") -> dict:
        """All tensors under `prefix`, with the prefix removed from their names."""
        names = [k for k in self._where if k.startswith(prefix)]
        return {k[len(prefix):]: v for k, v in self._read(names, device).items()}

    def read_all(self, names, device="cpu") -> dict:
        """Several tensors at once, each file opened once."""
        return self._read(list(names), device)
