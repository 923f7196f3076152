#!/usr/bin/env bash
# Source this on the GPU machine (the device tool's image: torch 2.11, transformers 5.17, peft 0.21.0, no
# bitsandbytes, grpcio 1.84): installs the carried wheels (.whl/) and adapterd itself into /tmp/site.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, transformers, peft, bitsandbytes, grpc
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "grpcio", grpc.__version__, "gpu", torch.cuda.get_device_name(0))
PY
