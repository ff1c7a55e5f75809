#!/usr/bin/env bash
# The CUDA checks, as one script for a GPU machine (each step bounded, its log under $OUT or ./gpu_check):
#   1. every similarity measure on CUDA against the CPU, and GPU timings (gpu_check_similarity.py);
#   2. weight-space symmetries of every replica and tiny transformers family on CUDA: spec, random element,
#      transformed copy, output errors in eval and train mode (bench_symmetry_coverage.py --device cuda);
#   3. planted recovery through align on CUDA, ResNet-18/50 replicas, both methods (bench_alignment.py);
#   4. the stitching tests, which run on the default device ("auto": CUDA there);
#   5. batched training of 8 Myrtle CNNs against one after another, on CUDA (bench_batched_training.py);
#   6. the main job at the smoke scale on CUDA.
#     PYTHONPATH=src bash benchmarks/gpu_check.sh
set -u -o pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
py=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run it bounded, log to $out/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc, $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
step similarity 120 "$py" benchmarks/gpu_check_similarity.py
step symmetries 150 "$py" benchmarks/bench_symmetry_coverage.py --device cuda --seeds 2
step alignment 150 "$py" benchmarks/bench_alignment.py --planted --planted-set torchvision-resnet --trials 1 \
    --device cuda
step stitching 150 "$py" -m pytest tests/test_stitching.py -q -p no:cacheprovider
step batched 150 "$py" benchmarks/bench_batched_training.py --models 8 --epochs 3 --device cuda
step smoke 150 "$py" -m intertwiners.cli reproduce --scale smoke --device cuda --workers 4 --out /tmp/smoke \
    --quiet
cp /tmp/smoke/report.md "$out/smoke_report.md" 2>/dev/null
echo "gpu_check: $([ $status = 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED')"
exit $status
