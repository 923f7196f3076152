#!/usr/bin/env bash
# On the two-GPU machine (device tool, kind nvidia-h200-x2), issue 21's serving half in one call:
#   source bench/device_setup.sh && bash bench/gpu_multi.sh
# (device_setup.sh carries .whl, as for bench/gpu_core.sh). Logs and bench/RESULTS.md go to $OUT.
#   tests   the two-core tests on cuda:0,cuda:1 (PEFT parity on each GPU, affinity, spill-over, per-core
#           metrics, kill -9 of one core) and the router's unit tests, about a minute
#   load    load_bench on the Llama-2-7B shape, int8 base: 1,000 Zipf adapters over 64 and 256 closed-loop
#           streams, one core (cuda:0) against one per GPU (cuda:0,cuda:1), from the same run; the Zipf
#           Poisson sweep and the engine-alone phases are skipped (--devices-only: they fit no 10-minute call)
# Without an argument: tests, then load; each part is bounded so that both fit in one 10-minute call.
set -o pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpus.log"
run_tests() {
  ADAPTERD_TEST_DEVICE=cuda timeout 150 python3 -P -m pytest -q -p no:cacheprovider --import-mode=append \
    -o addopts="" tests/server/core/test_multi_core.py tests/server/core/test_router.py 2>&1 | tail -15 \
    | tee "$OUT/multi_tests.log"
}
run_load() {
  timeout 420 python3 bench/load_bench.py --shape llama2-7b --quantization "${1:-int8}" --rates "" \
    --duration 10 --streams 64,256 --adapters 1000 --distinct 50 --client-procs 4 \
    --devices cuda:0,cuda:1 --devices-only --work /tmp/adapterd-bench 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/multi_load.log" | tail -12
}
case ${1:-all} in
  tests) run_tests ;;
  load) run_load "$2" ;;
  all) run_tests; run_load "$2" ;;
esac
cp bench/RESULTS.md "$OUT/" 2>/dev/null
