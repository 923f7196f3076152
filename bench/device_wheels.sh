#!/usr/bin/env bash
# Fill .whl/ (git ignores it) with the wheels that the device tool's GPU image lacks, for `carry` (64 MiB in all):
# what bench/device_setup.sh installs there. Run here, on the CPU machine, after ./scripts/setup:
#
#   bash bench/device_wheels.sh            # the versions this checkout's .venv resolved: what CI tests
#
# The image runs CPython 3.12 on x86_64 Linux (torch 2.11 cu130, transformers, peft; no bitsandbytes, grpcio 1.84),
# so each wheel is downloaded for that platform, not this machine's. bitsandbytes' wheel (43 MB) holds a library
# for every CUDA and ROCm it supports; torch cu130 loads libbitsandbytes_cuda130.so alone, so the others are cut
# out (and out of the wheel's RECORD): 7 MB. Optional wheels (liger-kernel, torchao: bench/gpu_train.sh and the
# torchao part of gpu_decode.sh) go to .whl/optional/, which device_setup.sh does not install.
#
# WHEEL_PACKAGES and OPTIONAL_WHEELS (names, or name==version) override the two lists; WHEEL_DIR the folder;
# VENV_PYTHON the interpreter whose installed versions pin the names given without one (and whose pip downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
WHEEL_PACKAGES=${WHEEL_PACKAGES:-"bitsandbytes grpcio grpcio-health-checking grpcio-reflection grpcio-status \
googleapis-common-protos google-re2 pyzmq msgspec starlette uvicorn"}
OPTIONAL_WHEELS=${OPTIONAL_WHEELS-"liger-kernel==0.8.5 torchao==0.18.0"}  # not in the CPU venv: tested versions

pinned() {  # each name as name==version, the version from VENV_PYTHON's installed distributions
  "$VENV_PYTHON" - "$@" <<'PY'
import importlib.metadata as metadata
import sys

for spec in sys.argv[1:]:
    if "==" in spec:
        print(spec)
        continue
    try:
        print(f"{spec}=={metadata.version(spec)}")
    except metadata.PackageNotFoundError:
        sys.exit(f"device_wheels.sh: {spec} is not installed in the venv (run ./scripts/setup first, or name a version)")
PY
}

download() {  # download DIR SPEC...: wheels for the GPU image's CPython 3.12 on x86_64 Linux, no dependencies
  local dir=$1
  shift
  "$VENV_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}

slim_bitsandbytes() {  # keep the CUDA 13 library alone (the image's torch is cu130)
  local wheel
  for wheel in "$WHEEL_DIR"/bitsandbytes-*.whl; do
    [ -f "$wheel" ] || continue
    "$VENV_PYTHON" - "$wheel" "$wheel.part" <<'PY'
import re
import sys
import zipfile

dropped = re.compile(r"libbitsandbytes_(cuda1[12]|rocm|xpu)[^/]*$")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if dropped.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the dropped files' lines too, or pip refuses it
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped.search(line.split(",")[0])).encode()
        dst.writestr(item, data)
PY
    mv "$wheel.part" "$wheel"  # whole or not at all: written beside it, then renamed over it
  done
}

mkdir -p "$WHEEL_DIR"
read -r -a names <<< "$WHEEL_PACKAGES"
pins=$(pinned "${names[@]}")  # (an assignment, so that a name missing from the venv stops the script)
read -r -d '' -a specs <<< "$pins" || true
download "$WHEEL_DIR" "${specs[@]}"
slim_bitsandbytes
if [ -n "$OPTIONAL_WHEELS" ]; then
  read -r -a optional <<< "$OPTIONAL_WHEELS"
  download "$WHEEL_DIR/optional" "${optional[@]}"
fi
du -sh "$WHEEL_DIR" | awk '{print "'"$WHEEL_DIR"': " $1 " (carry holds 64 MiB in all)"}'
ls "$WHEEL_DIR"
