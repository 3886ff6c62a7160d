"""GPTQ checkpoint directories: writing them atomically, and loading them into a Qwen model with QuantLinear layers.

Layout (what transformers + optimum, GPTQModel/AutoGPTQ and vLLM read): one safetensors shard per decoder block plus
one for the rest, `model.safetensors.index.json`, `quantize_config.json`, `quantization_config` inside
`config.json`, the tokenizer files and our model code (so `trust_remote_code=True` works).
"""
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from qwen_model.chat_files import write_chat_files
from qwen_model.checkpoint import (LazyCheckpoint, describe_names, harmless_extra, holds_safetensors,
                                   replace_dir_atomically, write_remote_code)

from .float16_linear import Float16Linear
from .quant_linear import QuantLinear

logger = logging.getLogger(__name__)

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def is_checkpoint_dir(path) -> bool:
    path = Path(path)
    return (path / "config.json").exists() or any(path.glob("*.safetensors"))


class CheckpointWriter:
    """Writes a GPTQ checkpoint into a temporary sibling of `out_dir`, renamed into place by `finish()`.

    While it writes it holds an exclusive lock on `.<name>.lock` beside `out_dir` (`OutputLock`), so two runs
    writing the same output cannot interleave; `finish()` and `abort()` release it."""

    def __init__(self, out_dir, num_shards: int, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise FileExistsError(f"output path {self.out_dir} exists and is not a directory")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(self.out_dir)
        try:
            if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
                what = "a checkpoint" if is_checkpoint_dir(self.out_dir) else "files"
                raise FileExistsError(f"output directory {self.out_dir} already holds {what}; pass --overwrite to "
                                      "replace it")
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        except BaseException:
            self.lock.release()
            raise
        self.tmp.chmod(0o755)
        self.num_shards = num_shards
        self.weight_map = {}
        self.total_size = 0
        self._next = 1

    def write_shard(self, tensors: dict) -> None:
        """Save one shard (tensors made contiguous and owned) and record its names in the index."""
        name = f"model-{self._next:05d}-of-{self.num_shards:05d}.safetensors"
        self._next += 1
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        except SafetensorError as e:  # the Rust writer's I/O errors (disk full, quota) are not OSErrors
            raise OSError(f"cannot write {self.tmp / name}: {e}") from None
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()

    def finish(self, source_dir, config: dict, quantize_config: dict, remote_code: bool = True) -> Path:
        """Write index, configs, tokenizer files and (with `remote_code`, for Qwen v1) our model code, then move the
        directory into place."""
        if self._next - 1 != self.num_shards:
            raise RuntimeError(f"wrote {self._next - 1} shards, expected {self.num_shards}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (self.tmp / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copyfile(Path(source_dir) / name, self.tmp / name)
        if remote_code:
            write_remote_code(self.tmp)
        write_chat_files(self.tmp)
        replace_dir_atomically(self.tmp, self.out_dir)
        self.lock.release()
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()


class OutputLock:
    """An exclusive `flock` on `.<name>.lock` beside an output directory, taken without waiting.

    The OS drops it when the process dies however it dies; `release()` also removes the file. A run that takes the
    lock re-checks that the path still names the file it locked, since a finishing run may have just removed it."""

    def __init__(self, out_dir):
        self.path = Path(out_dir).with_name(f".{Path(out_dir).name}.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(f"another run is writing {out_dir} (it holds {self.path}); wait for it to "
                                      "finish or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def gptq_settings(config, path=None) -> dict | None:
    """The GPTQ settings of a checkpoint: `quantization_config` in config.json, else (with `path`) the directory's
    `quantize_config.json` (older AutoGPTQ exports carry only that); None when neither is there.

    The checkpoint format defaults to "gptq" (v1 zero points), the only one AutoGPTQ wrote."""
    qc = getattr(config, "quantization_config", None)
    source = "config.json quantization_config"
    if qc is None and path is not None and (Path(path) / "quantize_config.json").exists():
        source = f"{Path(path) / 'quantize_config.json'}"
        try:
            qc = json.loads((Path(path) / "quantize_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e})") from None
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "gptq":
        raise ValueError(f"unsupported quantization method {qc.get('quant_method')!r} in {source} (this toolkit reads "
                         "gptq)")
    lacking = [key for key in ("bits", "group_size") if key not in qc]
    if lacking:
        raise ValueError(f"{source} lacks {', '.join(lacking)}")
    if qc.get("is_marlin_format"):
        raise ValueError(f"{source}: Marlin-repacked checkpoints are not read; use the plain GPTQ export")
    qc["checkpoint_format"] = qc.get("checkpoint_format") or "gptq"
    return qc


def has_gptq_tensors(path) -> bool:
    """Whether the directory's safetensors hold GPTQ layers (`*.qweight`)."""
    return holds_safetensors(path) and any(k.endswith(".qweight") for k in LazyCheckpoint(path).keys())


def replace_linears(model: nn.Module, qc: dict, blocks=None, names=BLOCK_LINEARS, kernel: str = "auto") -> None:
    """Swap the named nn.Linear of every decoder block (default: a Qwen v1 model's) for an empty QuantLinear of the
    same shape, running on `kernel` (see QuantLinear)."""
    fmt = qc.get("checkpoint_format", "gptq")
    for block in model.transformer.h if blocks is None else blocks:
        for name in names:
            parent_name, attr = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, attr)
            layer = QuantLinear(qc["bits"], qc["group_size"], linear.in_features, linear.out_features,
                                linear.bias is not None, checkpoint_format=fmt, kernel=kernel)
            setattr(parent, attr, layer)


def load_quantized(model_cls, path, config, device=None, kernel: str = "auto"):
    """Build `model_cls(config)` with QuantLinear layers on `kernel` and load a GPTQ checkpoint into it, strictly.

    Settings come from `gptq_settings`; GPTQ tensors without settings, missing tensors, tensors with no place in the
    model and shape mismatches are one clear error each, naming the tensors. Known harmless extras
    (`harmless_extra`) are skipped and logged. Nothing is ever left randomly initialised."""
    qc = gptq_settings(config, path)
    if qc is None:
        raise ValueError(f"{path} holds GPTQ tensors (qweight, ...) but no quantization settings: neither config.json "
                         "quantization_config nor quantize_config.json gives bits and group_size")
    config.quantization_config = qc
    with torch.device("meta"):
        model = model_cls(config)
    replace_linears(model, qc, kernel=kernel)
    model.to_empty(device=device or "cpu")
    stored = load_gptq_state(model, path, f"{path}: checkpoint does not match a {qc['bits']}-bit GPTQ Qwen model "
                                          "with this config.json")
    keep_float16_head(model, stored, config, kernel)
    logger.info("loaded %d-bit GPTQ checkpoint %s (QuantLinear kernel=%r)", qc["bits"], path, kernel)
    return model.eval()


def load_gptq_state(model: nn.Module, path, what: str, tied: tuple = ()) -> dict:
    """Fill `model` (QuantLinear layers in place) from the checkpoint at `path`, strictly, and take its generation
    config. Missing tensors (other than the `tied` ones, which share another tensor), tensors with no place in the
    model and shape mismatches are one clear error each (prefixed `what`), naming the tensors. Known harmless extras
    (`harmless_extra`) are skipped and logged. Nothing is ever left randomly initialised. Returns the stored dtype
    of each tensor loaded."""
    reader = LazyCheckpoint(path)
    device = next(iter(model.state_dict().values())).device
    state = reader.read_all(reader.keys(), device)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    for name in [n for n in state if n not in expected]:
        reason = harmless_extra(name, state[name], model)
        if reason is not None:
            logger.info("skipping %s: %s", name, reason)
            del state[name]
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing:
        raise ValueError(f"{what}: missing tensors {describe_names(missing)}")
    if unexpected:
        raise ValueError(f"{what}: unexpected tensors {describe_names(unexpected)}")
    wrong = [f"{n} {tuple(t.shape)} (expected {tuple(expected[n].shape)})" for n, t in state.items()
             if t.shape != expected[n].shape]
    if wrong:
        raise ValueError(f"{what}: tensor shapes differ: {describe_names(wrong)}")
    model.load_state_dict(state, strict=not tied)
    stored = {name: tensor.dtype for name, tensor in state.items()}
    gen_config = Path(path) / "generation_config.json"
    if gen_config.exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return stored


def keep_float16_head(model: nn.Module, stored: dict, config, kernel: str) -> None:
    """On CPU with float32 activations, run an untied lm_head in the float16 a GPTQ checkpoint declares as its dtype
    (`output_config`) or stores it in (`Float16Linear`: half the memory of the float32 upcast, a decoded token's
    logits ~3x faster), except for `kernel="torch"`, the reference, which keeps the float32 head."""
    head = model.get_output_embeddings()
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    half = stored.get("lm_head.weight") == torch.float16 or str(dtype).removeprefix("torch.") == "float16"
    if (kernel != "torch" and half and isinstance(head, nn.Linear) and head.weight.device.type == "cpu"
            and head.weight.dtype == torch.float32 and head.weight is not model.get_input_embeddings().weight):
        model.set_output_embeddings(Float16Linear.from_linear(head))
        logger.info("lm_head kept in the checkpoint's float16 (quantize.float16_linear)")


def output_config(source_config, quantize_config: dict) -> dict:
    """config.json of the quantized model: the source's fields plus `quantization_config`, dtype float16.

    float16 whatever the source's dtype (Qwen-7B-Chat says bfloat16): vLLM computes in the config's dtype, so in
    bfloat16 it would round the float16 scales chosen by the range search, and its non-Marlin `gptq` kernels run
    only in float16. Both keys are written: transformers 5 reads `dtype`, older readers `torch_dtype`. The precision
    flags of this package's own model (bf16/fp16/fp32) are left as they were."""
    config = source_config.to_dict()
    config.pop("_name_or_path", None)
    config["quantization_config"] = {**quantize_config, "quant_method": "gptq"}
    return with_serving_dtype(config)


def with_serving_dtype(config: dict) -> dict:
    """config.json contents with the dtype recorded as float16 (see `output_config`)."""
    return {**config, "dtype": "float16", "torch_dtype": "float16"}

