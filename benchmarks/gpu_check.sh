#!/usr/bin/env bash
# The GPU checks of issues 3 and 4 in one prepared run, for a machine with a CUDA GPU (CI has
# none). From the repository root, with torch, torchvision, timm, onnxruntime and pytest
# installed (pytest-xdist optional; keras and h5py too: without them the tests of Keras files are
# left out; the package itself comes from src/, no install needed):
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh [STAGE ...]     # default: every stage
#
# On an H200 (16 CPUs, torch 2.11): tests_gpu 177 s in 8 xdist workers (the compiled training
# run alone 118 s), bench_train 170 s, bench_infer 128 s; the default suite, run there with 16
# workers, 235 s. Name fewer stages to fit a shorter slot: `tests_gpu bench_train` first.
# Stages, each under its own time limit so one hang cannot eat the rest; each writes its log
# (and the benchmarks their JSON) to $OUT:
#   tests_gpu      python -m pytest -m gpu: the CUDA tests (AMP, compile, resume, NCCL, bench)
#   bench_train    training at 224x224, batch 256, AMP + channels_last: our trainer against a
#                  plain loop over torchvision's, our and timm's model, in the same rounds; then
#                  an op table per contender in $OUT/profile (where ours and the loop differ)
#   bench_infer    mobilenetv2 bench on the GPU backends against torchvision on the GPU
#   tests_default  the default suite, on a machine where CUDA is there (training picks it)
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

STAGES=" ${*:-tests_gpu bench_train bench_infer tests_default} "

stage() {  # stage NAME SECONDS COMMAND...: stdout to NAME.out, stderr to NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  [[ $STAGES == *" $name "* ]] || return 0
  echo "== $name: $*"
  # -k: the trainer catches SIGTERM to save a checkpoint, so a stage may need a SIGKILL to end.
  timeout -k 10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
  echo "== $name: exit $? after $((SECONDS - start)) s"
  for f in "$OUT/$name.out" "$OUT/$name.log"; do [ -s "$f" ] || rm -f "$f"; done
  tail -n 4 "$OUT/$name".* | cut -c1-400
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  "$PY" -c 'import platform, torch, torchvision, timm, onnxruntime as ort
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "torchvision", torchvision.__version__,
      "timm", timm.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())
print(torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())'
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# Keras' tests import keras, which a GPU image rarely has: leave them out there, not fail to collect.
no_keras=()
"$PY" -c 'import keras, h5py' 2>/dev/null || no_keras=(--ignore=tests/test_keras.py -k "not keras")
xdist=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")  # parallel where pytest-xdist is
# The CUDA tests in parallel too: most of their time is torch.compile and subprocess start-up on
# the CPUs, and the GPU has memory for all of them at once.
stage tests_gpu 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts= --strict-markers -rfEs \
  $xdist --durations=15 "${no_keras[@]}"
stage bench_train 200 "$PY" benchmarks/bench_train.py --device cuda --resolution 224 \
  --batch-size 256 --steps 20 --rounds 5 --profile "$OUT/profile" --json
stage bench_infer 240 "$PY" -m mobilenetv2 bench --resolution 224 --batch-sizes 1,32,256 \
  --backends cuda_fp32,cuda_fp16,cuda_bf16,cuda_compile,cuda_graphs,ort_cuda,ort_tensorrt \
  --rounds 5 --round-time 0.5 --json
stage tests_default 300 "$PY" -m pytest -q -p no:cacheprovider $xdist -rfE "${no_keras[@]}"
