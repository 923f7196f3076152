#!/usr/bin/env bash
# On the two-GPU machine (device tool, kind nvidia-h200-x2), issue 21, two device calls:
#   source bench/device_setup.sh > /tmp/setup.log 2>&1; bash bench/gpu_multi.sh          # serving: tests, load
#   source bench/device_setup.sh > /tmp/setup.log 2>&1; bash bench/gpu_multi.sh train    # training
# (device_setup.sh carries .whl, as for bench/gpu_core.sh; set ADAPTERD_COMMIT). Logs, JSON and
# bench/RESULTS.md go to $OUT.
#   tests   the two-core tests on cuda:0,cuda:1 (PEFT parity on each GPU, affinity, spill-over, per-core
#           metrics, kill -9 of one core) and the router's unit tests, about a minute
#   load    load_bench on the Llama-2-7B shape, int8 base: 1,000 Zipf adapters over 64 and 256 closed-loop
#           streams, one core (cuda:0) against one per GPU (cuda:0,cuda:1), from the same run; the Zipf
#           Poisson sweep and the engine-alone phases are skipped (--devices-only: they fit no 10-minute call)
#   train   bench/multi_train.py: int8 LoRA, then int8 P-Tuning v2, on the random 7B base (train_bench.py's,
#           written first if the machine has none), one GPU against torchrun on two with the same global
#           batch: tokens/s, peak memory per GPU, loss per step, LoRA resumed from rank 0's checkpoint; JSON
#           after every run, so a call cut short keeps what ran. Then, here:
#           python3 bench/multi_train.py --append-from multi_train.json (rows into bench/RESULTS.md)
# Without an argument: tests, then load; each part is bounded so that both fit in one 10-minute call, and
# train (base <= 150 s, runs <= 380 s, each killed 20 s after its bound) fits one call of its own.
# TRAIN_ARGS is added to multi_train.py's options (tests/bench/test_multi_train.py runs the train part on
# the CPU with --tiny that way).
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
    --devices cuda:0,cuda:1 --devices-only --work /tmp/adapterd-bench 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "$OUT/multi_load.log" | tail -12
}
run_train() {  # the base first, in a step of its own: a slow disk shows as that step's timeout, not the runs'
  timeout -k 20 150 python3 bench/multi_train.py --prepare-only $TRAIN_ARGS 2>&1 | tee "$OUT/multi_train_base.log" \
    | tail -3 || return
  timeout -k 20 380 python3 bench/multi_train.py --no-append --json-out "$OUT/multi_train.json" $TRAIN_ARGS 2>&1 \
    | grep --line-buffered -v "Loading weights" | tee "$OUT/multi_train.log" | tail -12
}
case ${1:-all} in
  tests) run_tests ;;
  load) run_load "$2" ;;
  train) run_train ;;
  all) run_tests; run_load "$2" ;;
  *) echo "usage: bash bench/gpu_multi.sh [tests|load [int8|none]|train|all]" >&2; exit 2 ;;
esac
status=$?
cp bench/RESULTS.md "$OUT/" 2>/dev/null
exit $status
