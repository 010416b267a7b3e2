#!/usr/bin/env bash
# Whole-process time and peak memory of `thinslice upsample`, two methods side by side, with GNU time:
#
#   benchmarks/time_upsample.sh INPUT SPACING_MM [RUNS] [METHOD_A] [METHOD_B] [-- extra upsample arguments]
#   benchmarks/time_upsample.sh runs/timing/thick_75x512x512_4mm.nii.gz 1 3 cubic-dc planes
#
# The runs alternate (A, B, A, B, ...) so that a drift of the machine's speed hits both; prints every run's wall
# seconds and peak resident memory, the medians and the median of the per-pair ratios B / A. Threads: set
# OMP_NUM_THREADS (default 2). The input for the 512 x 512 x 300 x4 budget is written by
#   .venv/bin/python -c "from thinslice.data.phantom import make_chest_phantom; from thinslice.io import write_volume;
#   write_volume(make_chest_phantom((75, 512, 512), (0.7, 0.7, 4.0), seed=0), 'runs/timing/thick_75x512x512_4mm.nii.gz')"
set -euo pipefail
input=$1; spacing=$2; runs=${3:-3}; a=${4:-cubic-dc}; b=${5:-planes}
shift $(( $# < 5 ? $# : 5 )); [ "${1:-}" = "--" ] && shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
one() {  # method [extra arguments] -> "seconds peak_MB"
    local method=$1; shift
    /usr/bin/time -f "%e %M" -o "$out/t" .venv/bin/thinslice -q upsample "$input" "$out/o.nii.gz" --overwrite \
        --spacing "$spacing" --method "$method" "$@" >/dev/null
    awk '{printf "%.1f %.0f\n", $1, $2 / 1024}' "$out/t"
}
for i in $(seq "$runs"); do
    ra=$(one "$a" "$@"); rb=$(one "$b" "$@")
    echo "run $i: $a ${ra% *} s (${ra#* } MB)   $b ${rb% *} s (${rb#* } MB)"
    echo "${ra% *} ${rb% *}" >> "$out/pairs"
done
python3 - "$out/pairs" "$a" "$b" <<'PY'
import statistics, sys
pairs = [tuple(map(float, line.split())) for line in open(sys.argv[1])]
a, b = zip(*pairs)
ratios = [y / x for x, y in pairs]
print(f"median: {sys.argv[2]} {statistics.median(a):.1f} s, {sys.argv[3]} {statistics.median(b):.1f} s "
      f"(range {min(b):.1f}-{max(b):.1f}); ratio {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
PY
