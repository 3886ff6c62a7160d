"""Builds and loads the CUDA KV-cache kernels (``cache_autogptq_cuda_256``) on demand with torch's JIT loader.

The build goes to ``$QWEN_QUANT_KERNEL_DIR`` if set, else ``~/.cache/qwen_quant/kernels``, and is reused by later
processes. It is attempted only when CUDA is available; any failure logs one warning and yields ``None`` so callers
fall back to another attention backend.
"""
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EXTENSION_NAME = "cache_autogptq_cuda_256"
KERNEL_DIR_ENV = "QWEN_QUANT_KERNEL_DIR"
_SOURCES = ("cache_autogptq_cuda_256.cpp", "cache_autogptq_cuda_256.cu")

_state = {"tried": False, "module": None}


def kernel_build_dir() -> Path:
    """Directory the extension is built into (created on demand)."""
    override = os.environ.get(KERNEL_DIR_ENV)
    return Path(override) if override else Path.home() / ".cache" / "qwen_quant" / "kernels"


def loaded_cache_kernels():
    """The extension if it was already loaded in this process, else None (never triggers a build)."""
    return _state["module"]


def load_cache_kernels():
    """Builds (first time) and imports the extension; returns the module, or None when unavailable."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if not torch.cuda.is_available() or torch.version.cuda is None:
        logger.warning("CUDA KV-cache kernels not built: no CUDA device/toolkit in this torch build")
        return None
    try:
        from torch.utils.cpp_extension import load

        build_dir = kernel_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).resolve().parent
        _state["module"] = load(
            name=EXTENSION_NAME,
            sources=[str(here / src) for src in _SOURCES],
            build_directory=str(build_dir),
            extra_cuda_cflags=["-O3"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 -- any build/import failure means "fall back", reported once
        logger.warning("CUDA KV-cache kernels could not be built or loaded (%s); falling back", err)
        _state["module"] = None
    return _state["module"]
