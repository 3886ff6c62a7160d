"""Builds and loads the CUDA KV-cache kernels (``cache_autogptq_cuda_256``) on demand with torch's JIT loader, and
the build step the CPU extensions share (``build_cpu_extension``: the KV-cache and the GPTQ CPU kernels).

The builds go to ``$QWEN_QUANT_KERNEL_DIR`` if set, else ``~/.cache/qwen_quant/kernels``, and are reused by later
processes. The CUDA build is attempted only when CUDA is available; any failure logs one warning and yields ``None``
so callers fall back to another attention backend.
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


def build_cpu_extension(name: str, source: Path, portable: bool, what: str, fallback: str):
    """Builds (first time on this machine, into ``kernel_build_dir() / name``) and imports a C++ CPU extension; the
    module, or None after one warning naming ``what`` and the ``fallback``. OpenMP is on (without it ATen's
    ``at::parallel_for`` compiles to a serial loop); ``portable=False`` adds ``-march=native`` (AVX-512 where the CPU
    has it), ``portable=True`` builds the plain loops, so tests cover what a CPU without AVX-512 runs."""
    name = name + ("_portable" if portable else "")
    flags = ["-O3", "-fopenmp"] + ([] if portable else ["-march=native"])
    try:
        from torch.utils.cpp_extension import load

        build_dir = kernel_build_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("loading the %s (built into %s on first use, about half a minute)", what, build_dir)
        return load(name=name, sources=[str(source)], build_directory=str(build_dir), extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 -- any build/import failure means "fall back", reported once
        logger.warning("%s could not be built or loaded (%s); using %s", what, err, fallback)
        return None


def load_once(state: dict, portable: bool, name: str, source: Path, what: str, fallback: str):
    """``build_cpu_extension`` at most once per process and flavour, its result (the module or None) kept in
    ``state[portable]``: the loaders of the CPU extensions are called on every decode op."""
    if portable not in state:
        state[portable] = build_cpu_extension(name, source, portable, what, fallback)
    return state[portable]


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
