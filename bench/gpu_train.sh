#!/usr/bin/env bash
# On the GPU machine (device tool), issue 20's training measurements; `source bench/device_setup.sh` first, in
# the same call. liger-kernel's wheel goes in .whl/optional/ (device_setup.sh leaves that folder alone): the
# parts that measure the fused loss install it into $SITE. One part a device call (each under its 10 minutes;
# the first also writes the random 7B base, reused while the machine stays warm). Logs, JSON and each
# scenario's profile (top operators by CUDA and CPU time) go to $OUT:
#   lora      usual-lora-int8 (llama-recipes' PEFT recipe), lora-int8 (ours, plain loss), lora-int8-fused (ours,
#             liger-kernel's fused linear cross-entropy), lora-int8-fused-kernels (that plus --kernels auto:
#             liger's RMSNorm, RoPE and SwiGLU in the base; the row says whether they ran)
#   ptuning   usual-ptuning-int8, ptuning-int8, ptuning-int8-fused, ptuning-int8-fused-kernels
#   extra     lora-int8-fused-torch-kernels (our chunked torch loss instead of liger's, with liger's kernels:
#             the fast path if liger's loss is what moves the LoRA curve, see isolate), lora-int8-fused-torch,
#             lora-bf16, lora-bf16-fused, lora-int8-kernels (the kernels alone, plain loss)
#   tests     the trainer's fused-loss, kernels and loss-curve tests on CUDA (liger against the plain model)
#   curve     issue 20's loss-curve figure (bench/loss_curve.py, ~3.5 min): 200 steps of LoRA and P-Tuning v2 on the
#             tutorial's examples, `adapterd train` at its GPU defaults against plain PEFT in bf16, in fp32 and
#             in bf16 with eager attention, each run's final adapter scored by plain PEFT in fp32;
#             train_curve.json, .log and curve-METHOD.svg; then here `python3 bench/loss_curve.py --append-from
#             train_curve.json` (CURVE_ARGS overrides, e.g. --steps 4 in tests/bench/test_loss_curve.py)
#   isolate   (~3 min) the LoRA curve again with one piece of the fast path changed at a time: --kernels off,
#             --fused-loss off, --fused-loss torch (our chunked loss instead of liger's), then kernels and fused
#             loss both off, against one pair of PEFT curves (train_isolate.json and .log; at 286d702 the LoRA
#             curve at the defaults read max 6.0e-02 against noise 5.5e-02: which piece, if any, moves it).
#             Here: python3 bench/loss_curve.py --append-from train_isolate.json
#   seeds     (~6 min) the curve part's LoRA runs from seeds 7, 8 and 9 (loss_curve.py --seeds): where the final
#             adapters end, ours against PEFT's variants, by a permutation test (train_seeds.json and .log; at
#             fc938e1 ours ended 0.0051 above PEFT, its variants within 0.0015: one seed). SEEDS_ARGS overrides.
#   grads     (~1 min) bench/kernel_grads.py: the LoRA gradient with each of liger's kernels alone and all, in bf16,
#             against fp32's (relative L2 error), beside plain bf16's own: which kernel, if any, biases it, at the
#             start and at plain PEFT's LoRA after 100 steps (--after-steps 0,100; kernel_grads.json and .log)
# Then, here: python3 bench/train_bench.py --append-from train_PART.json (rows into bench/RESULTS.md).
# BENCH_ARGS, CURVE_ARGS, SEEDS_ARGS, GRADS_ARGS, TEST_DEVICE and SITE override the defaults (tests/bench/test_gpu_train.py and
# test_loss_curve.py run the parts on the CPU that way, so that no device call is lost to a typo here).
set -o pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
part=${1:-}
SITE=${SITE:-/tmp/site}
liger() {
  if compgen -G ".whl/optional/liger_kernel-*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/optional/liger_kernel-*.whl
  fi
  python3 -c "import liger_kernel.transformers" 2>&1 | tail -1 || true  # why the torch loss runs, if it does
}
bench() {  # bench NAME SCENARIOS
  python3 bench/train_bench.py --scenarios "$2" --no-append --json-out "$OUT/train_$1.json" \
    --profile-dir "$OUT/profile" $BENCH_ARGS 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/train_$1.log" | tail -20
}
case "$part" in
  lora) liger; bench lora usual-lora-int8,lora-int8,lora-int8-fused,lora-int8-fused-kernels ;;
  ptuning) liger; bench ptuning usual-ptuning-int8,ptuning-int8,ptuning-int8-fused,ptuning-int8-fused-kernels ;;
  extra) liger
    bench extra lora-int8-fused-torch-kernels,lora-int8-fused-torch,lora-bf16,lora-bf16-fused,lora-int8-kernels ;;
  tests)
    liger
    ADAPTERD_TEST_DEVICE=${TEST_DEVICE:-cuda} python3 -m pytest -q -p no:cacheprovider \
      tests/trainer/test_fused_loss.py tests/trainer/test_kernels.py tests/trainer/test_loss_curve.py 2>&1 | tee "$OUT/train_tests.log" | tail -15
    ;;
  curve)
    liger
    python3 bench/loss_curve.py --json-out "$OUT/train_curve.json" --svg-dir "$OUT" $CURVE_ARGS 2>&1 \
      | grep --line-buffered -v "Loading weights" | tee "$OUT/train_curve.log" | tail -40
    ;;
  seeds)
    liger
    python3 bench/loss_curve.py --json-out "$OUT/train_seeds.json" --svg-dir "$OUT" ${SEEDS_ARGS:---methods lora --seeds 7,8,9} 2>&1 \
      | grep --line-buffered -v "Loading weights" | tee "$OUT/train_seeds.log" | tail -40
    ;;
  grads)
    liger
    python3 bench/kernel_grads.py --json-out "$OUT/kernel_grads.json" ${GRADS_ARGS:---after-steps 0,100} 2>&1 \
      | grep --line-buffered -v "Loading weights" | tee "$OUT/kernel_grads.log" | tail -20
    ;;
  isolate)
    liger
    python3 bench/loss_curve.py --methods lora --trainer-args="--kernels off" --trainer-args="--fused-loss off" \
      --trainer-args="--fused-loss torch" --trainer-args="--kernels off --fused-loss off" \
      --json-out "$OUT/train_isolate.json" $CURVE_ARGS 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/train_isolate.log" \
      | grep -E "==|trainer:|_vs_|noise"
    ;;
  *) echo "usage: bash bench/gpu_train.sh lora|ptuning|extra|tests|curve|isolate|seeds|grads" >&2; exit 2 ;;
esac
