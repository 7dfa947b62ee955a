#!/usr/bin/env bash
# The GPU check of issue 7: the training-step benchmark in bfloat16 (ViT-B/16 and
# MAE-B/16 at batch 256, scanned blocks) and the test suite on the CPU, on one machine
# with one NVIDIA GPU. Goal: ViT-B/16 bf16 training at 50% MFU or more on an H100.
#
#   scripts/gpu_check.sh [all|bench|tests]     # from the repository root; default all
#
# Writes under $OUT (default /tmp/gpu_check): env.txt (GPU, versions), bench.log and
# bench.jsonl (scripts/benchmark.py --preset=gpu_bf16: table, PASS/FAIL lines, JSON
# rows), tests.log (pytest on the CPU). Exits non-zero if a stage failed.
#
# Packages. The benchmark needs jax with CUDA, flax, optax, orbax-checkpoint, chex,
# absl-py, numpy, etils and pillow (all in this workplace's CUDA image) and also
# ml-collections, grain, tensorflow-datasets, array-record, tensorboardX,
# importlib-resources and their dependencies, which the image lacks and a GPU machine
# without network cannot fetch. Fetch them once, on a machine with network, as wheels
# for the GPU machine's Python (3.12, x86-64) into .whl/ (git-ignored, about 20 MB):
#
#   scripts/gpu_check.sh fetch-wheels
#
# and let .whl/ travel with the checkout; this script installs whatever is in .whl/
# into /tmp/site first. Through this workplace's device tool:
#   run(command='scripts/gpu_check.sh', carry=['.whl'], timeout_s=600)
# (or 'scripts/gpu_check.sh bench' and 'scripts/gpu_check.sh tests' in two calls, if
# both do not fit in one call's 10 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"

# Missing from the CUDA image (see .library/device/KINDS.md); versions as in this
# checkout's environment (requirements.txt and what it pulled in).
WHEELS="ml-collections grain tensorflow-datasets array-record tensorboardX importlib-resources
  toml termcolor tensorflow-metadata googleapis-common-protos simple-parsing docstring-parser
  immutabledict dm-tree portpicker promise"

if [[ "$stage" == fetch-wheels ]]; then
  mkdir -p .whl
  for name in $WHEELS; do
    version="$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))")" || exit 1
    # Binary wheels for CPython 3.12 on x86-64 Linux; a package published only as
    # source (promise) is built here into a pure-Python wheel.
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$name==$version" \
      || "$PYTHON" -m pip wheel -q --no-deps -w .whl "$name==$version" || exit 1
  done
  ls -l .whl && du -sh .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" --version
  "$PYTHON" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__); print(jax.devices())' 2>&1
} | tee "$OUT/env.txt"

status=0
if [[ "$stage" == all || "$stage" == bench ]]; then
  # BENCH_ARGS replaces the preset, e.g. for a dry run of this script on a CPU.
  timeout 420 "$PYTHON" scripts/benchmark.py ${BENCH_ARGS:---preset=gpu_bf16} \
      --output="$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.log" || status=1
  grep -q '^FAIL' "$OUT/bench.log" && status=1
fi
if [[ "$stage" == all || "$stage" == tests ]]; then
  # The suite simulates 8 CPU devices (tests/conftest.py); the GPU stays out of it.
  JAX_PLATFORMS=cpu timeout 540 "$PYTHON" -m pytest -q -p no:cacheprovider 2>&1 \
      | tee "$OUT/tests.log" || status=1
fi
exit $status
