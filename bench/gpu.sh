#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one prepared run: correctness (providers, parity with Keras,
# CPU/CUDA labels), served vs raw throughput and first requests (bench/cuda_check.py,
# bench/cuda_serving.py), the test tier without TensorFlow on --device cuda, then the overhead
# and batch-size sweeps (bench/overhead.py, bench/scaling.py) with and without I/O binding, and
# the vgg16 sweep with EXHAUSTIVE search and with TF32.
#
#   bash bench/gpu.sh prepare   # HERE (network, TensorFlow): wheels, wheel parts, repositories, Keras reference
#   then, through the device tool, back to back (a machine stays warm ~30 s after a call):
#     run carry [".gpu1"] "ls -la .gpu1"   ... one call per part folder but the last ...
#     run carry [".gpuN", ".whl", ".gpurepo"] "bash bench/gpu.sh run" timeout_s 570
#     give_back
#
# `run` (THERE: Python 3.12, CUDA 13 + cuDNN 9 pip libraries, onnxruntime 1.30 CPU, no TensorFlow):
# installs onnxruntime-gpu 1.31.1, our wheels and the test tools into /tmp/site, puts the pip
# NVIDIA libraries on LD_LIBRARY_PATH, refills the random vgg16 weights left out to fit the 64 MiB
# carry limit (bench/_common.py pack/unpack), then runs each step under its own time limit, most
# important first. $OUT/gpu.log has everything printed; $OUT/gpu-results.tar.gz (every JSON and
# PNG) is rewritten after each step, so a run cut short still brings back what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MB=58

prepare() {
  local py=${PYTHON:-.venv/bin/python} d i=0 part
  for d in .gpu1 .gpu2 .gpu3 .gpu4 .gpu5 .gpu6 .whl .gpurepo; do
    grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude
  done
  rm -rf .gpu[1-9] .whl .gpurepo /tmp/fusionserve-ort && mkdir -p .whl .gpurepo /tmp/fusionserve-ort
  dl() {
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
  }
  ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  dl /tmp/fusionserve-ort onnxruntime-gpu==1.31.1
  dl .whl "grpcio==$(ver grpcio)" "grpcio-health-checking==$(ver grpcio-health-checking)" \
    "grpcio-reflection==$(ver grpcio-reflection)" "protobuf==$(ver protobuf)" \
    "pytest==$(ver pytest)" "pytest-asyncio==$(ver pytest-asyncio)" "pluggy==$(ver pluggy)" \
    "iniconfig==$(ver iniconfig)" "tritonclient==$(ver tritonclient)" "python-rapidjson==$(ver python-rapidjson)"
  "$py" -m pip wheel -q --no-deps -w .whl .   # fusionserve itself: rerun prepare after changing it
  (cd /tmp/fusionserve-ort && ls onnxruntime_gpu-*.whl >"$OLDPWD/.whl/ort.name" && split -b ${PART_MB}m ./*.whl ort.part.)
  for part in /tmp/fusionserve-ort/ort.part.*; do
    i=$((i + 1)) && mkdir -p ".gpu$i" && mv "$part" ".gpu$i/"
  done
  "$py" bench/_common.py repository --backbone small >/dev/null
  "$py" bench/_common.py repository --backbone vgg16 >/dev/null
  cp -r bench/results/repo-small .gpurepo/small
  "$py" bench/_common.py pack bench/results/repo-vgg16 .gpurepo/vgg16
  "$py" bench/cuda_check.py reference --trained bench/results/trained-small --out .gpurepo/keras-reference.npz
  du -sh .gpu[1-9] .whl .gpurepo
  echo "tracked tree: $(git ls-files -z | du --files0-from=- -cb | tail -1 | cut -f1) bytes"
  echo "carry .gpu1 … .gpu$((i - 1)) one per call, then .gpu$i + .whl + .gpurepo with 'bash bench/gpu.sh run'"
}

snapshot() {  # every result so far into $OUT (a run cut short still brings back what it measured)
  tar czf "$OUT/gpu-results.tar.gz" -C bench/results --exclude './repo-*' --exclude './trained-*' \
    --exclude ./gpu . 2>/dev/null || true
}

step() {  # step SECONDS NAME COMMAND...: run one step under its own limit; a failed step does not stop the run
  local limit=$1 name=$2 t=$SECONDS rc=0
  shift 2
  echo "== [$((SECONDS))s] $name"
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "-- $name: exit $rc after $((SECONDS - t))s"
  snapshot
}

run() {
  local dur=${DURATION:-1} libs="" dir wheel
  # The NVIDIA pip libraries (CUDA 13, cuDNN 9), found before PYTHONPATH can shadow anything.
  for dir in $(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))'); do
    libs+=$(find "$dir" -maxdepth 3 -type d -name lib -printf '%p:')
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
  wheel=/tmp/$(cat .whl/ort.name)   # pip wants the wheel's own file name
  cat .gpu[1-9]/ort.part.* >"$wheel"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheel" .whl/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  echo "== [$((SECONDS))s] machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvidia-smi | head -4 | tail -2 || true
  python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
  python3 -m pip list 2>/dev/null | grep -iE '^(nvidia-(cudnn|cublas|cuda-runtime|cuda-nvrtc)|numpy|grpcio|protobuf|pytest|hypothesis) ' || true
  python3 -c 'from fusionserve.server.runtime import cuda_unavailable_reason as r; print("CUDA provider:", r() or "loads")'
  rm -rf /tmp/repo-small /tmp/repo-vgg16
  cp -r .gpurepo/small /tmp/repo-small && cp -r .gpurepo/vgg16 /tmp/repo-vgg16
  python3 bench/_common.py unpack /tmp/repo-vgg16
  local small=(--repository /tmp/repo-small) repos=(--repository /tmp/repo-small --vgg16-repository /tmp/repo-vgg16)

  step 150 "providers, parity with Keras, CPU/CUDA labels" \
    python3 bench/cuda_check.py check "${small[@]}" --reference .gpurepo/keras-reference.npz \
    --vgg16-repository /tmp/repo-vgg16
  step 170 "vgg16 image encoder: served vs raw, first requests, GPU memory" \
    python3 bench/cuda_serving.py --repository /tmp/repo-vgg16 --duration 4 \
    --compare-option cuda_conv_algo_search=EXHAUSTIVE --compare-option cuda_arena_extend_strategy=kNextPowerOfTwo
  step 170 "tests without TensorFlow, --device cuda" \
    python3 -m pytest -m "not tf" --device cuda -q -rfE -p no:cacheprovider --timeout 120 \
    --deselect tests/test_stubs.py::test_committed_stubs_are_up_to_date
  step 80 "scaling, io_binding=true" python3 bench/scaling.py "${repos[@]}" --device cuda --io-binding true \
    --duration "$dur" --max-call-s 60
  step 60 "overhead, io_binding=true" python3 bench/overhead.py "${small[@]}" --device cuda --io-binding true \
    --duration "$dur"
  step 60 "scaling, io_binding=false" python3 bench/scaling.py "${repos[@]}" --device cuda --io-binding false \
    --duration "$dur" --max-call-s 60 --parts batch,streams
  step 60 "overhead, io_binding=false" python3 bench/overhead.py "${small[@]}" --device cuda --io-binding false \
    --duration "$dur"
  step 45 "vgg16 batch sweep, EXHAUSTIVE" python3 bench/scaling.py "${repos[@]}" --device cuda --duration "$dur" \
    --max-call-s 60 --parts batch --backbones vgg16 --cuda-option cudnn_conv_algo_search=EXHAUSTIVE
  step 30 "vgg16 batch sweep, TF32" python3 bench/scaling.py "${repos[@]}" --device cuda --duration "$dur" \
    --max-call-s 60 --parts batch --backbones vgg16 --cuda-option use_tf32=1
  echo "== [$((SECONDS))s] done"
}

case "${1:-}" in
  prepare) prepare ;;
  run) OUT=${OUT:-bench/results/gpu} && mkdir -p "$OUT" && run 2>&1 | tee "$OUT/gpu.log" ;;
  *) echo "usage: bash bench/gpu.sh prepare|run   (see the comments at the top)" >&2 && exit 2 ;;
esac
