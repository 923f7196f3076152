#!/usr/bin/env bash
# Source this on the GPU machine (the device tool's image: torch 2.11, transformers 5.17, peft 0.21.0, no
# bitsandbytes, grpcio 1.84): installs the carried wheels (.whl/) and adapterd itself into /tmp/site.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Triton's cache (compiled kernels, and the autotuners' choices: they cache_results) in one folder that
# gpu_decode.sh archives to $OUT at its end, named by GPU model. Carried back as .whl/cache/triton-<GPU>.tar.gz,
# a fresh machine of that model starts from it, sparing the compiles and the autotuners' timings. Triton keys
# each entry by the kernel's source and the configs, so a changed kernel compiles and tunes afresh.
export ADAPTERD_GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -f ".whl/cache/triton-$ADAPTERD_GPU_NAME.tar.gz" ]; then
  tar -xzf ".whl/cache/triton-$ADAPTERD_GPU_NAME.tar.gz" -C "$TRITON_CACHE_DIR"
  echo "Triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files from .whl/cache/triton-$ADAPTERD_GPU_NAME.tar.gz"
fi
python3 - <<'PY'
import torch, transformers, peft, bitsandbytes, grpc
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "grpcio", grpc.__version__, "gpu", torch.cuda.get_device_name(0))
PY
