#!/usr/bin/env bash
# Makes this checkout ready for benchmarks/gpu.py on a lent GPU machine, which has torch and
# transformers but neither ../shared, nor zarr and its helpers, nor a network. Run here, once:
#
#     bash benchmarks/gpu_prepare.sh          # SHARED=../shared, DEVICE_PYTHON=3.12 by default
#
# It copies the T5-base shape (config + tokenizer, no weights) and RTE into ./shared (git-ignored; the
# device tool carries a checkout's shared/ folder), downloads the store's dependencies as wheels for the
# device's Python into ./.whl (git-ignored; name it in `carry`), and prints the one command to run there.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
PY=${PY:-.venv/bin/python}

mkdir -p shared/models shared/data/glue
cp -r "$SHARED/models/t5-base-shape" shared/models/
cp -r "$SHARED/data/glue/RTE" shared/data/glue/

# The same versions as this environment's, so the device writes the stores the tests here checked.
mapfile -t wheels < <("$PY" - <<'PY'
from importlib.metadata import version
for name in ("zarr", "numcodecs", "donfig", "google-crc32c", "crc32c", "xxhash", "ml_dtypes", "typing_extensions"):
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        pass  # not installed here: not needed
print("nvidia-ml-py")  # NVML energy (pynvml); optional for the benchmark, pure Python
PY
)
rm -rf .whl
platforms=()
for n in 28 27 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh shared .whl

cat <<'CMD'
Ready. On the device (carry: [".whl"]; timeout_s 600). The command first runs tests/test_cuda.py (the CUDA paths
against the CPU; at most 150 s, its log in $OUT/cuda-tests.log), then benchmarks/write.py (the writer pool's
rate there, at most 90 s, $OUT/write.log), then the benchmark until 540 s from its start (about 6 minutes on one
H200 with every row), keeping its stores in /tmp/gpu-work, and last benchmarks/read.py on the per-token store
against zarr's read path (--zarr; $OUT/read.log). The benchmark prints every thread's stack 10 s before it is stopped,
and $OUT/gpu.json keeps every phase measured by then, a failed phase's traceback included:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 GLUE_DIR=shared/data/glue; cp BENCHMARKS.md $OUT/; end=$((SECONDS + 540)); timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee $OUT/cuda-tests.log; timeout 90 python3 benchmarks/write.py --writers 1,8 --codecs blosc-lz4,blosc-zstd,none --reps 1 2>&1 | tee $OUT/write.log; left=$((end - SECONDS)); timeout $left python3 benchmarks/gpu.py --task rte --glue-dir shared/data/glue --tokenizer shared/models/t5-base-shape --work /tmp/gpu-work --results $OUT/gpu.json --benchmarks $OUT/BENCHMARKS.md --stacks-after $((left - 10)); timeout 45 python3 benchmarks/read.py /tmp/gpu-work/all.zarr --reps 2 --zarr 2>&1 | tee $OUT/read.log

Back here: copy the returned BENCHMARKS.md's "## GPU" section in, or rebuild it from the figures with
.venv/bin/python benchmarks/gpu.py --render <files_at>/gpu.json
CMD
