#!/usr/bin/env bash
# On the GPU machine (device tool), issue 14's measurements and checks; `source bench/device_setup.sh` first
# (it carries .whl). Logs and bench/RESULTS.md go to $OUT. LOAD_ARGS: more load_bench arguments (later ones win:
# tests/bench/test_gpu_core.py runs the load part on the CPU with the tiny shape that way).
#   load QUANT   load_bench (Llama-2-7B shape): engine alone against gRPC end to end at 64 and 256 streams,
#                TTFT of 512 tokens, CPU per token by process; the Zipf sweep at 8 requests/s
#   profile QUANT  64 streams only, both ways, with 50 decode steps of each side under the torch profiler
#                (server/engine/profiling.py): $OUT/profile/{alone,core}/engine-*.txt, operators by device and
#                host time, to say where a step slower in the core than alone spends the difference (its ratio
#                is no figure: the profiler runs in the window, and writing its tables stalls the engine)
#   floor        (~30 s, no GPU used) bench/grpc_floor.py: a bare gRPC server's first message, at once and after a
#                20 ms wait, on this host's CPU: the part of load's TTFT gap that no front end of ours can save
#                (FLOOR_ARGS: more of its arguments)
#   tests        (~7 min: give the call 450 s; the engine core's own tests first, so that a cut run still has
#                them) parity (fp32 and int8 bases), the batched sampler, admission, the engine core's process and
#                its faults, the kernels' compile probe with the compiler hidden, all on CUDA
set -o pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
part=${1:-tests}
case $part in
  load) python3 bench/load_bench.py --shape llama2-7b --quantization "${2:-none}" --rates 8 --duration 10 --zipf-duration 30 \
          --streams 64,256 --client-procs 4 --work /tmp/adapterd-bench $LOAD_ARGS 2>&1 | grep --line-buffered -v "Loading weights" \
          | tee "$OUT/load_${2:-none}.log" | tail -12 ;;
  profile) python3 bench/load_bench.py --shape llama2-7b --quantization "${2:-none}" --rates "" --duration 10 \
          --streams 64 --client-procs 4 --work /tmp/adapterd-bench --profile-dir "$OUT/profile" --no-record $LOAD_ARGS \
          2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/profile_${2:-none}.log" | tail -6 ;;
  floor) python3 bench/grpc_floor.py $FLOOR_ARGS 2>&1 | tee "$OUT/grpc_floor.log" ;;
  tests) ADAPTERD_TEST_DEVICE=cuda python3 -P -m pytest -q -p no:cacheprovider --import-mode=append -o addopts="" \
          tests/server/core/test_engine_process.py tests/server/test_generate_rpc.py \
          tests/server/kernels/test_support.py tests/server/engine/test_admission.py \
          tests/server/engine/test_batch_sampler.py tests/server/engine/test_sampling.py \
          tests/server/engine/test_parity.py 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
esac
cp bench/RESULTS.md "$OUT/" 2>/dev/null
