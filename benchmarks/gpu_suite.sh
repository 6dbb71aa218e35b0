#!/usr/bin/env bash
# The GPU suite: every GPU figure of the project in one command, each as a ratio measured in the same run.
#
#   benchmarks/gpu_suite.sh                  # on a machine with one (or more) NVIDIA GPU(s); about 8 minutes
#   benchmarks/gpu_suite.sh --cpu-dry-run    # every part's code path on the CPU with tiny sizes (tests use it)
#
# Parts (each a benchmark of benchmarks/, run with a time limit; its whole output goes to $LOGS/<part>.log):
#   1. framework vs a hand-written DDP loop: train_throughput.py, 1 GPU, NCCL, bf16, channels_last
#   2. input pipeline delivered vs consumed: input_pipeline.py (batched path, device augmentation)
#   3. 2D inference ms per 512 x 512 slice, U-Net, bf16 (goal <= 5 ms): inference_speed.py
#   4. 3D sliding-window seconds per 240 x 240 x 155 x 4 volume, fp32 and bf16: predict3d.py (autocnnp predict)
#   5. TensorFlow vs torch: tensorflow_framework.py (the framework vs a hand-written MWMS loop; the demo job)
#   6. allreduce bus bandwidth vs the device's bound: allreduce_busbw.py (the link bound needs 2 GPUs)
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); LOGS the log folder (default: a new
# temporary one). Exits 0 when every part ran, 1 when one failed or ran out of time (the others still run).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOGS=${LOGS:-$(mktemp -d -t autocnnp-gpu-suite-XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_suite: no CUDA GPU visible to torch here; benchmarks/gpu_suite.sh --cpu-dry-run checks the code paths" >&2
  exit 2
fi
mkdir -p "$LOGS"
FAILED=0
START=$SECONDS

# part NAME LIMIT_S PATTERN ARGS...: run one benchmark in its own process group, print the lines matching PATTERN
part() {
  local name=$1 limit=$2 pattern=$3 rc
  shift 3
  echo "== $name"
  timeout --signal=TERM --kill-after=10 "$limit" "$PYTHON" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  grep -E "$pattern" "$LOGS/$name.log" | sed 's/^/   /'
  if [ "$rc" != 0 ]; then
    FAILED=1
    [ "$rc" = 124 ] && echo "   TIMED OUT after ${limit} s (see $LOGS/$name.log)" || echo "   FAILED (exit $rc): see $LOGS/$name.log"
  fi
}
trap 'echo "gpu_suite: interrupted" >&2; exit 130' INT TERM

if [ "$DRY" = 1 ]; then
  echo "gpu_suite --cpu-dry-run: the code paths on the CPU, tiny sizes: the figures mean nothing"
  TRAIN=(--device cpu --ranks 1 --launcher inplace --size 32 --depth 2 --base-channels 4 --batch 2 --warmup 1
         --steps 2 --rounds 1)
  PIPE=(--size 32 --depth 2 --base-channels 4 --batch 2 --samples 8 --epochs 1 --steps 2 --rounds 1 --workers 0)
  INFER=(--models unet --size 64 --batch-sizes 1 --rounds 1 --min-time 0.01)
  TF=(--ranks 1 --rounds 1 --steps 2 --epochs 1 --demo-rounds 1 --set degree=1 --set data.train_samples=8 --set data.valid_samples=4)
  BUS=(--device cpu --sizes-mb 1 --iterations 2)
  PRED3D=(--vs-precision --device cpu --shape 24,24,12 --patch 8,16,16 --depth 2 --base-channels 4 --skip-memory)
  LIMIT=300
else
  "$PYTHON" -c "import torch; print('gpu_suite on', torch.cuda.get_device_name(0), '(torch', torch.__version__ + ')')"
  TRAIN=(--device cuda --precision bf16 --channels-last --ranks 1 --rounds 3)
  PIPE=(--device cuda --precision bf16 --channels-last --rounds 3)
  INFER=(--device cuda --precision bf16 --models unet --size 512 --batch-sizes 1,8 --rounds 5)
  TF=(--ranks 1 --rounds 3 --steps 30 --epochs 3 --set degree=1)
  BUS=(--device cuda)
  PRED3D=(--vs-precision --device cuda --precision bf16 --skip-memory)
  LIMIT=
fi

part framework_vs_ddp "${LIMIT:-100}" "^ratio framework / hand" benchmarks/train_throughput.py "${TRAIN[@]}"
part input_pipeline "${LIMIT:-80}" "^lowest ratio|^training consumes" benchmarks/input_pipeline.py "${PIPE[@]}"
part inference_2d "${LIMIT:-70}" "^unet |^thesis" benchmarks/inference_speed.py "${INFER[@]}"
if [ -f "$LOGS/inference_2d.log" ]; then  # the best ms per slice against the 5 ms goal (its first decimal column)
  awk '$1 == "unet" { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+$/) { ms = $i; break }
                      if (best == "" || ms + 0 < best + 0) best = ms }
       END { if (best != "") printf "   best ms per slice / 5 ms goal: %.2f\n", best / 5 }' "$LOGS/inference_2d.log"
fi
part sliding_window_3d "${LIMIT:-120}" "x4, |s per volume" benchmarks/predict3d.py "${PRED3D[@]}"
if "$PYTHON" -c "import tensorflow" >/dev/null 2>&1; then
  part tensorflow "${LIMIT:-150}" "^framework / hand-written|^tensorflow / torch" benchmarks/tensorflow_framework.py "${TF[@]}"
else
  echo "== tensorflow"
  echo "   skipped: TensorFlow is not installed (make tensorflow)"
fi
part allreduce "${LIMIT:-40}" "^allreduce|busbw|^device copy" benchmarks/allreduce_busbw.py "${BUS[@]}"
echo "gpu_suite: $((SECONDS - START)) s; logs in $LOGS"
exit $FAILED
