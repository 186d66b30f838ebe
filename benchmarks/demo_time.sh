#!/bin/bash
# Issue 21: `make demo` against the filing commit, interleaved on one idle machine (wall times drift ~10 % between
# runs and ~20 % between days, so only runs made side by side compare). Each cycle runs, back to back:
#   filing  the filing commit's demo (2054cc6: fp32, corpus v1, 5 048 images, 300-image task splits)
#   lfl     this checkout's demo on the filing's workload (run_demo(n_unpaired=1024, n_task=300); corpus v3)
#   new     this checkout's `maskedclip-demo` (the default workload: 19 216 images, 1 000-image task splits)
#   old     BEFORE's `maskedclip-demo` (default ae894cf, the last commit before this round)
# Usage: bash benchmarks/demo_time.sh [cycles=2] [BEFORE=ae894cf] [OUT=runs/demo_time]
# Needs the venv of `make venv` (both old commits run on it) and ~20 min per cycle on 2 cores; prints one line per run
# ("name ELAPSED seconds") and leaves each run's folder (results.json with its timings) under OUT.
set -euo pipefail
cycles=${1:-2}; before=${2:-ae894cf}; out=$(realpath -m "${3:-runs/demo_time}")
repo=$(git rev-parse --show-toplevel); mkdir -p "$out"
export PATH="$repo/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for c in 2054cc6 "$before"; do
  [ -d "$out/src-$c" ] || git -C "$repo" worktree add -f --detach "$out/src-$c" "$c" >/dev/null
done
run() { # name source-dir python-code
  local name=$1 src=$2 code=$3
  rm -rf "$out/$name"
  (cd "$src" && /usr/bin/time -f "ELAPSED %e" env PYTHONPATH="$src" python -c "
import sys, maskedclip
assert maskedclip.__file__.startswith('$src'), maskedclip.__file__
$code" >"$out/$name.log" 2>&1)
  echo "$name $(grep ELAPSED "$out/$name.log" | cut -d' ' -f2) s ($(date +%H:%M:%S))"
}
for k in $(seq 1 "$cycles"); do
  run "c$k-filing" "$out/src-2054cc6" "from maskedclip.demo import main; sys.exit(main(['--out', '$out/c$k-filing']))"
  run "c$k-lfl" "$repo" "from maskedclip.demo import run_demo; run_demo('$out/c$k-lfl', n_unpaired=1024, n_task=300, progress=False, log=lambda *a: None)"
  run "c$k-new" "$repo" "from maskedclip.demo import main; sys.exit(main(['--out', '$out/c$k-new']))"
  run "c$k-old" "$out/src-$before" "from maskedclip.demo import main; sys.exit(main(['--out', '$out/c$k-old']))"
done
