#!/usr/bin/env bash
# On the GPU machine (device tool), issue 18's decode measurements and checks; `source bench/device_setup.sh`
# first (it installs the carried .whl/: torchao's wheel goes in .whl/optional/, installed by the torchao part only, see bench/NOTES.md).
# Logs, JSON and bench/RESULTS.md go to $OUT. One part a device call (each under its 10 minutes):
#   first        the call to make first, whichever card comes (a call for an H200 may get an H100): on an H200,
#                issue 18's open line, `serve int8` then `serve none` with the own decoder forward only
#                (FIRST_QUANTS overrides the list), then `serve none` again with FIRST_AB's switches (by default
#                o_proj's expand in its float matmul's launch; empty: not run); on any other card, what every card checks: every kernel's
#                `gpu` test (KERNEL_TEST_PATHS) and then the `tests` part
#   serve QUANT  serve_bench, Llama-2-7B shape, QUANT = int8 or none (bf16), the own and transformers' decoder
#                forwards on one loaded base: batch-1 decode, 32 adapters over base-only, TTFT, fast path vs eager,
#                batch invariance (8 requests alone vs in 32 rows), teacher-forced figures (base and LoRA rows)
#   kernels      int8_kernel_bench (ours vs torch._weight_int8pack_mm at M = 1, 8, 32, 64; prefill rows too) and
#                lora_kernel_bench (32 rows on 32 adapters, one layer)
#   torchao      int8_kernel_bench, ours vs torchao's int8 weight-only under torch.compile (max-autotune: 12
#                compiles, each tuning matmul templates) at M = 1, 8, 32, 64; only where torchao imports
#   attention    attention_bench: one layer's rotary + cache write + decode attention, today's ops against the
#                same under torch.compile and against flex_attention over per-row lengths (Llama-2-7B and
#                Llama-3-8B heads, 1 and 32 rows, ctx 512 in a 640-entry bucket), each checked against fp32 first
#   tests        tests/server/engine on CUDA (ADAPTERD_TEST_DEVICE=cuda) but the architecture matrix: parity on the
#                fp32 and int8 bases with both decoder forwards, the own decoder against transformers per family
#                (test_decoder.py), graphs, sampling, row isolation
#   matrix       tests/server/engine/test_architectures.py on CUDA (every family, both forwards)
#   pdl          pdl_bench: the engine's decode step with PDL on and off at 1-64 rows and 32 LoRA rows, int8 and
#                bf16 (where int8_matmul.PDL_MAX_BUCKET comes from); PDL_ARGS="--switch shrink,expand ..." times
#                several switches in turn after one load and warm-up (bench/pdl_switches.py names them)
#   tiles        tile_bench: the int8 one-row step with each GEMV tile of one split for each weight shape in turn
#                (whether the autotuner's pick is the step's best)
#   gap          gap_bench: a one-row int8 step built up from its graph alone (inputs' copy, fed tokens, tokens
#                out, run ahead) to the engine's step: where the time between two graphs goes
#   pick         pick_bench: the greedy pick kernel against torch's at 32,000 and 128,256-token vocabularies
#   folds        the LoRA folds' checks (the nineteenth session's, none yet run on a GPU): the GPU tests of the add +
#                norm, SiLU and LoRA kernels (the twentieth's: what each compiled to as launched, no 2-byte tile
#                access), the engine's fold tests (tests/server/adapters/test_lora_group.py) and the
#                min-length parity tests on CUDA; then `pdl` with PDL_ARGS="--switch fold ..." times them
#   shrink       the LoRA shrinks in their int8 matmuls' launches (kernels/int8_shrink.py, on by default): its GPU
#                tests, then the engine's parity tests on CUDA with it switched on for the run
#                (ADAPTERD_TEST_SWITCHES=kernels.int8_shrink.IN_MATMUL), then `pdl` with PDL_ARGS="--switch shrink
#                --quantizations int8 --rows 1,8,32" times it
#   dense        a float base's fused matmuls at 2-64 rows through the split-K kernel with their LoRA shrinks in its
#                launch (kernels/dense_splitk.py, on by default): its GPU tests and the engine's parity tests on
#                CUDA with both switches on for the run, then `pdl` with PDL_ARGS="--switch dense --quantizations
#                none --rows 8,32 --lora-rows 32" times it (and prints each tuned bucket against F.linear)
#   expand       o_proj's LoRA delta's sums in its own matmul's launch (kernels/int8_expand.py; on for int8, off
#                for float weights): `pdl` with PDL_ARGS="--switch expand --quantizations int8,none --rows 32" times
#                it first (what decides), then its GPU tests and the engine's parity tests on CUDA with both
#                switched on for the run (ADAPTERD_TEST_SWITCHES=kernels.int8_expand.IN_MATMUL,...FLOAT_IN_MATMUL)
# SERVE_ARGS, KERNEL_ARGS, ATTENTION_ARGS, PDL_ARGS, TILE_ARGS, GAP_ARGS, PICK_ARGS, TEST_DEVICE, TEST_PATHS,
# FIRST_QUANTS, FIRST_AB and KERNEL_TEST_PATHS override the defaults
# (tests/bench/test_gpu_decode.py runs each part on the CPU with the tiny shape that way, so that no device call
# is lost to a typo here).
set -o pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
part=${1:-}
ENGINE_TESTS="tests/server/engine --ignore=tests/server/engine/test_architectures.py"  # the matrix: its own part
serve() {  # $2, where given, names a second log of one quantization (serve_QUANT_$2.log)
  python3 bench/serve_bench.py --shape llama2-7b --quantizations "$1" --decoders own,transformers \
    --work /tmp/adapterd-bench $SERVE_ARGS 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "$OUT/serve_$1${2:+_$2}.log" | tail -45
}
kernels() {  # both run; the part fails if either does (int8_kernel_bench exits 1 on a method OVER tolerance)
  local rc=0
  python3 bench/int8_kernel_bench.py --methods int8pack --json-out "$OUT/int8.json" $KERNEL_ARGS 2>&1 \
    | tee "$OUT/int8_kernel.log" | tail -40 || rc=1
  python3 bench/lora_kernel_bench.py --json-out "$OUT/lora.json" 2>&1 | tee "$OUT/lora_kernel.log" | tail -12 || rc=1
  return $rc
}
torchao() {
  # Only this part installs torchao (carried in .whl/optional/, which device_setup.sh leaves alone): PEFT and
  # transformers change paths when torchao imports, and no other measurement should run with it.
  if compgen -G ".whl/optional/torchao-*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optional/torchao-*.whl
  fi
  python3 bench/int8_kernel_bench.py --methods torchao --rows 1,8,32,64 --json-out "$OUT/int8_torchao.json" \
    $KERNEL_ARGS 2>&1 | tee "$OUT/int8_torchao.log" | tail -25
}
attention() {
  if compgen -G ".whl/optional/liger_kernel-*.whl" > /dev/null; then  # its rotary is one of the variants
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optional/liger_kernel-*.whl
  fi
  python3 bench/attention_bench.py --json-out "$OUT/attention.json" $ATTENTION_ARGS 2>&1 \
    | tee "$OUT/attention.log" | tail -20
}
pdl() {
  python3 bench/pdl_bench.py --work /tmp/adapterd-bench $PDL_ARGS 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "$OUT/pdl.log" | tail -30
}
tiles() {
  python3 bench/tile_bench.py --work /tmp/adapterd-bench $TILE_ARGS 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "$OUT/tiles.log" | tail -45
}
gap() {
  python3 bench/gap_bench.py --work /tmp/adapterd-bench $GAP_ARGS 2>&1 | grep --line-buffered -v "Loading weights" \
    | tee "$OUT/gap.log" | tail -12
}
pick() {
  python3 bench/pick_bench.py --json-out "$OUT/pick.json" $PICK_ARGS 2>&1 | tee "$OUT/pick.log" | tail -12
}
folds() {  # both run; the part fails if either does
  local rc=0
  ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} python3 -P -m pytest -q -rs -p no:cacheprovider --import-mode=append \
    -o addopts="" -m gpu tests/server/kernels/test_rms_norm.py tests/server/kernels/test_silu_mul.py \
    tests/server/kernels/test_lora_bgmv.py 2>&1 \
    | tee "$OUT/fold_kernels.log" | tail -8 || rc=1
  engine_tests "${TEST_PATHS:-tests/server/adapters/test_lora_group.py \
    tests/server/engine/test_parity.py::test_a_minimum_length_bans_eos_as_transformers_does \
    tests/server/engine/test_parity.py::test_the_one_launch_pick_gives_the_same_tokens_in_the_engine}" fold_engine || rc=1
  return $rc
}
shrink() {  # each runs; the part fails if either does
  local rc=0
  ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} ADAPTERD_TEST_SWITCHES=kernels.int8_shrink.IN_MATMUL python3 -P -m pytest -q \
    -rs -p no:cacheprovider --import-mode=append -o addopts="" ${TEST_PATHS:-tests/test_switches.py \
    tests/server/kernels/test_int8_shrink.py tests/server/adapters/test_lora_group.py tests/server/engine/test_parity.py \
    tests/server/engine/test_row_isolation.py} 2>&1 | tee "$OUT/shrink_tests.log" | tail -12 || rc=1
  PDL_ARGS=${PDL_ARGS:-"--switch shrink --quantizations int8 --rows 1,8,32"} pdl || rc=1
  return $rc
}
dense() {  # each runs; the part fails if either does
  local rc=0
  ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} ADAPTERD_TEST_SWITCHES=kernels.dense_splitk.IN_DECODE,kernels.int8_shrink.IN_MATMUL \
    python3 -P -m pytest -q -rs -p no:cacheprovider --import-mode=append -o addopts="" ${TEST_PATHS:-tests/test_switches.py \
    tests/server/kernels/test_dense_splitk.py tests/server/adapters/test_lora_group.py \
    tests/server/engine/test_parity.py} 2>&1 | tee "$OUT/dense_tests.log" | tail -12 || rc=1
  PDL_ARGS=${PDL_ARGS:-"--switch dense --quantizations none --rows 8,32 --lora-rows 32"} pdl || rc=1
  return $rc
}
expand() {  # each runs; the part fails if either does
  local rc=0
  PDL_ARGS=${PDL_ARGS:-"--switch expand --quantizations int8,none --rows 32"} pdl || rc=1
  local switches=kernels.int8_expand.IN_MATMUL,kernels.int8_expand.FLOAT_IN_MATMUL
  ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} ADAPTERD_TEST_SWITCHES=$switches \
    python3 -P -m pytest -q -rs -p no:cacheprovider --import-mode=append -o addopts="" ${TEST_PATHS:-tests/test_switches.py \
    tests/server/kernels/test_int8_expand.py tests/server/adapters/test_lora_group.py \
    tests/server/engine/test_parity.py} 2>&1 | tee "$OUT/expand_tests.log" | tail -12 || rc=1
  return $rc
}
first() {  # each runs; the part fails if any does
  local rc=0 quant
  echo "card: ${ADAPTERD_GPU_NAME:-none named}"
  if [[ "${ADAPTERD_GPU_NAME:-}" == *H200* ]]; then
    for quant in ${FIRST_QUANTS:-int8 none}; do
      SERVE_ARGS="--decoders own $SERVE_ARGS" serve "$quant" || rc=1
    done
    # then bf16 again with the A/B's switches (set FIRST_AB empty to skip): o_proj's LoRA B read in its matmul's
    # launch, not by the fold (bench/NOTES.md, the thirty-third session)
    local ab=${FIRST_AB-"--set kernels.int8_expand.FLOAT_IN_MATMUL=True"}
    if [[ -n "$ab" ]]; then
      SERVE_ARGS="--decoders own $SERVE_ARGS $ab" serve none ab || rc=1
    fi
  else
    ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} python3 -P -m pytest -q -rs -p no:cacheprovider --import-mode=append \
      -o addopts="" -m gpu ${KERNEL_TEST_PATHS:-tests/server/kernels} 2>&1 | tee "$OUT/kernel_tests.log" | tail -8 || rc=1
    engine_tests "${TEST_PATHS:-$ENGINE_TESTS}" engine_tests || rc=1
  fi
  return $rc
}
engine_tests() {
  ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} python3 -P -m pytest -q -p no:cacheprovider --import-mode=append \
    -o addopts="" $1 2>&1 | tee "$OUT/$2.log" | tail -25
}
case $part in
  first) first ;;
  serve) serve "${2:-int8}" ;;
  kernels) kernels ;;
  torchao) torchao ;;
  attention) attention ;;
  pdl) pdl ;;
  tiles) tiles ;;
  gap) gap ;;
  pick) pick ;;
  folds) folds ;;
  shrink) shrink ;;
  dense) dense ;;
  expand) expand ;;
  tests) engine_tests "${TEST_PATHS:-$ENGINE_TESTS}" engine_tests ;;
  matrix) engine_tests "${TEST_PATHS:-tests/server/engine/test_architectures.py}" matrix_tests ;;
  *) echo "usage: bash bench/gpu_decode.sh first | serve int8|none | kernels | torchao | attention | pdl | tiles | gap | pick | folds | shrink | dense | expand | tests | matrix" >&2
     exit 2 ;;
esac
status=$?
cp bench/RESULTS.md "$OUT/" 2>/dev/null
# The Triton cache this machine now holds (device_setup.sh), for the next fresh one of its model, without the
# intermediate IRs (the image's Triton 3.6 loads a cached kernel from its metadata and cubin alone; 3.9 would
# compile it again); left out over 16 MiB (the most a file the device tool sends back; the whole cache was over
# at 3668cf5)
if [ -n "${ADAPTERD_GPU_NAME:-}" ] && [ -d "${TRITON_CACHE_DIR:-}" ]; then
  archive="$OUT/triton-$ADAPTERD_GPU_NAME.tar.gz"
  tar -czf "$archive" --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' --exclude='*.source' \
    -C "$TRITON_CACHE_DIR" . \
    && if [ "$(stat -c %s "$archive")" -gt 16000000 ]; then echo "Triton cache over 16 MB: not kept"; rm -f "$archive"; fi
fi
exit $status
