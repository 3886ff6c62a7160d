#!/usr/bin/env bash
# Compile-only check of the KV-cache CUDA extension (kvcache/cache_autogptq_cuda_256.{cu,cpp}) for sm_80 and sm_90.
# Works with the CPU torch wheel: it lacks c10/cuda/impl/cuda_cmake_macros.h, so a one-line stub is provided in a
# temporary include dir. Flags follow torch.utils.cpp_extension (C++20, as this torch's headers require). Exits non-zero on any compile error. Usage: .ci/compile_cuda.sh  (NVCC / PYTHON overridable)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python}"
src="$here/kvcache/cache_autogptq_cuda_256"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"

mapfile -t torch_flags < <("$python" - <<'PY'
import sysconfig
import torch
from torch.utils import cpp_extension
for path in cpp_extension.include_paths():
    print(f"-I{path}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
defines=(-DTORCH_EXTENSION_NAME=cache_autogptq_cuda_256 -DTORCH_API_INCLUDE_EXTENSION_H -std=c++20)
# CUDA headers for the host compiler: $CUDA_HOME, else /usr/local/cuda, else next to nvcc.
cuda_home="${CUDA_HOME:-}"
if [[ -z "$cuda_home" ]]; then
    if [[ -d /usr/local/cuda/include ]]; then cuda_home=/usr/local/cuda
    else cuda_home="$(dirname "$(dirname "$(readlink -f "$(command -v "$nvcc")")")")"; fi
fi

echo "nvcc: compiling ${src}.cu for sm_80 and sm_90"
"$nvcc" -c "${src}.cu" -o "$tmp/kernels.o" -O3 -Xcompiler -fPIC "${defines[@]}" "-I$tmp/include" "${torch_flags[@]}" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

echo "c++: compiling ${src}.cpp"
"${CXX:-c++}" -c "${src}.cpp" -o "$tmp/binding.o" -O1 -fPIC "${defines[@]}" "-I$tmp/include" "${torch_flags[@]}" \
    "-I$cuda_home/include"

echo "CUDA extension compiles"
