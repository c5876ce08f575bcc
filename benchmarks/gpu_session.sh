#!/usr/bin/env bash
# The results that this project computes on a GPU, in one call of a few minutes (the device tool's
# machines are lent for minutes at a time).  Outputs go into the repository's usual places, and the
# files that changed are packed into $OUT/gpu-session.tgz (with a log per part) to be brought back.
# Usage: OUT=DIR benchmarks/gpu_session.sh PART...   parts:
#   digits         the calibrated-digits grid (run_results.sh calibrated-digits, DEVICE=cuda): refits the
#                  shipped digits calibrations and reruns the grid, one shard per solver side by side
#   image64        the calibrated-image64 grid (run_results.sh calibrated-image64) on the machine's CPU cores
#   patches-train  trains the patches model (benchmarks/train_patches.sh) into steindiff/weights/patches
#   patches        the patches grid and calibrations (run_results.sh patches, DEVICE=cuda)
# Parts listed together before a '+' run side by side, e.g. `digits+patches-train patches`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT/logs"
if ! command -v steindiff > /dev/null; then
  steindiff() { python3 -m steindiff "$@"; }
  export -f steindiff
fi
export DEVICE=cuda PYTHONUNBUFFERED=1
# photographs of the patches data set where scikit-image is not installed: a folder `skimage/data` under .devdata
[[ -d .devdata/skimage ]] && export PYTHONPATH=$PWD/.devdata${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/logs/gpu.txt" 2>&1
touch "$OUT/.start"

part() {
  local t0=$SECONDS
  case $1 in
    digits) benchmarks/run_results.sh calibrated-digits ;;
    image64) DEVICE=cpu benchmarks/run_results.sh calibrated-image64 ;;  # a mixture: the host's CPU cores
    patches-train) benchmarks/train_patches.sh steindiff/weights/patches ;;
    patches) benchmarks/run_results.sh patches ;;
    *) echo "unknown part $1"; return 2 ;;
  esac
  local rc=$?
  echo "part $1: exit $rc after $((SECONDS - t0)) s"
  return $rc
}

# BUDGET_S (default 500): the parts stop when it is spent (a part cut short logs exit 124), so that the
# packing below always runs inside the device call's own limit
export -f part
deadline=$((SECONDS + ${BUDGET_S:-500}))
status=0
for group in "$@"; do
  pids=()
  for p in ${group//+/ }; do
    left=$((deadline - SECONDS))
    ((left > 0)) || left=1
    timeout --kill-after=5 "$left" bash -c "part $p" > "$OUT/logs/$p.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tail -n 1 "$OUT"/logs/*.log
done
# everything written since the start, for the trip back (at most a few MB)
find docs/results steindiff/weights -newer "$OUT/.start" -type f -print0 \
  | tar --null -czf "$OUT/gpu-session.tgz" --files-from - -C "$OUT" logs
tar -tzf "$OUT/gpu-session.tgz" | wc -l
exit $status
