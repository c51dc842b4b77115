#!/usr/bin/env bash
# GPU benchmarks: bench/overhead.py and bench/scaling.py with --device cuda, with and without I/O
# binding, vgg16 at 224x224. NOT YET RUN: written by reading /work/shared/GPU.md and the device
# README; the first session with a GPU machine must check it and report what it printed.
#
#   bash bench/gpu.sh prepare   # HERE (network, TensorFlow): wheels, wheel parts, repositories
#   then, through the device tool, back to back (a machine stays warm ~30 s after a call):
#     run carry [".gpu1"] "ls -la .gpu1"   ... one call per part folder but the last ...
#     run carry [".gpuN", ".whl", ".gpurepo"] "bash bench/gpu.sh run" timeout_s 540
#     give_back
#
# `run` (THERE: Python 3.12, CUDA 13 + cuDNN 9 pip libraries, onnxruntime 1.30 CPU, no TensorFlow):
# installs onnxruntime-gpu 1.31.1 and our grpcio/protobuf/health/reflection + fusionserve wheels
# into /tmp/site, puts the pip NVIDIA libraries on LD_LIBRARY_PATH, refills the random vgg16
# weights left out to fit the 64 MiB carry limit (bench/_common.py pack/unpack), runs the benches
# and writes $OUT/gpu.log and $OUT/gpu-results.tar.gz (every JSON and PNG).
#
# CUDA provider options: server and benches keep onnxruntime's defaults, recorded in each JSON
# (settings.provider_options): cudnn_conv_algo_search=EXHAUSTIVE (the first run of every new input
# shape times each cuDNN algorithm: benches warm up each batch size; a server's first batches of a
# new size are slow) and arena_extend_strategy=kNextPowerOfTwo (the arena grows in powers of two;
# kSameAsRequested holds less memory). The last pass reruns the vgg16 batch sweep with HEURISTIC.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
  local py=${PYTHON:-.venv/bin/python} d i=0 part
  for d in .gpu1 .gpu2 .gpu3 .gpu4 .gpu5 .gpu6 .whl .gpurepo; do
    grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude
  done
  rm -rf .gpu[1-9] .whl .gpurepo /tmp/fusionserve-ort && mkdir -p .whl .gpurepo /tmp/fusionserve-ort
  dl() {
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$@"
  }
  ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  dl /tmp/fusionserve-ort onnxruntime-gpu==1.31.1
  dl .whl "grpcio==$(ver grpcio)" "grpcio-health-checking==$(ver grpcio-health-checking)" \
    "grpcio-reflection==$(ver grpcio-reflection)" "protobuf==$(ver protobuf)"
  "$py" -m pip wheel -q --no-deps -w .whl .   # fusionserve itself: rerun prepare after changing it
  (cd /tmp/fusionserve-ort && ls onnxruntime_gpu-*.whl >"$OLDPWD/.whl/ort.name" && split -b 56m ./*.whl ort.part.)
  for part in /tmp/fusionserve-ort/ort.part.*; do
    i=$((i + 1)) && mkdir -p ".gpu$i" && mv "$part" ".gpu$i/"
  done
  "$py" bench/_common.py repository --backbone small >/dev/null
  "$py" bench/_common.py repository --backbone vgg16 >/dev/null
  cp -r bench/results/repo-small .gpurepo/small
  "$py" bench/_common.py pack bench/results/repo-vgg16 .gpurepo/vgg16
  du -sh .gpu[1-9] .whl .gpurepo
  echo "carry .gpu1 … .gpu$((i - 1)) one per call, then .gpu$i + .whl + .gpurepo with 'bash bench/gpu.sh run'"
}

run() {
  local dur=${DURATION:-2} libs="" dir iob parts wheel
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
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
  rm -rf /tmp/repo-small /tmp/repo-vgg16
  cp -r .gpurepo/small /tmp/repo-small && cp -r .gpurepo/vgg16 /tmp/repo-vgg16
  python3 bench/_common.py unpack /tmp/repo-vgg16
  local repos=(--repository /tmp/repo-small --vgg16-repository /tmp/repo-vgg16)
  for iob in true false; do
    parts=batch,streams,text && [ "$iob" = false ] && parts=batch,streams   # text: once is enough
    echo "== overhead, cuda, io_binding=$iob"
    python3 bench/overhead.py --repository /tmp/repo-small --device cuda --io-binding "$iob" --duration "$dur"
    echo "== scaling, cuda, io_binding=$iob"
    python3 bench/scaling.py "${repos[@]}" --device cuda --io-binding "$iob" --duration "$dur" --max-call-s 60 \
      --parts "$parts"
  done
  echo "== scaling, vgg16 batch sweep, cudnn_conv_algo_search=HEURISTIC"
  python3 bench/scaling.py "${repos[@]}" --device cuda --duration "$dur" --max-call-s 60 --parts batch \
    --backbones vgg16 --cuda-option cudnn_conv_algo_search=HEURISTIC
  tar czf "$OUT/gpu-results.tar.gz" -C bench/results --exclude './repo-*' --exclude './trained-*' --exclude ./gpu .
}

case "${1:-}" in
  prepare) prepare ;;
  run) OUT=${OUT:-bench/results/gpu} && mkdir -p "$OUT" && run 2>&1 | tee "$OUT/gpu.log" ;;
  *) echo "usage: bash bench/gpu.sh prepare|run   (see the comments at the top)" >&2 && exit 2 ;;
esac
