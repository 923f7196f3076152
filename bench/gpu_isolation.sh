#!/usr/bin/env bash
# On the GPU machine (device tool): the isolation and architecture suites with CUDA graphs and fused kernels on.
#   source bench/device_setup.sh first (carries .whl). Writes logs under $OUT.
set -o pipefail
export ADAPTERD_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
part=${1:-all}
run() { python3 -P -m pytest -q -p no:cacheprovider --import-mode=append -o addopts="" "$@"; }
case $part in
  isolation) run tests/server/engine --ignore=tests/server/engine/test_architectures.py \
               tests/server/test_isolation.py tests/server/adapters/test_lora.py tests/server/test_soak.py ;;
  matrix) run tests/server/engine/test_architectures.py tests/server/test_architecture.py ;;
esac
