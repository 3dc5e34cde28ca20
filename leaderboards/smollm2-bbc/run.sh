#!/usr/bin/env bash
# The commands that produced this leaderboard (2-core CPU). Re-running skips the runs already recorded.
set -euo pipefail
OUT=${OUT:-runs/smollm2}
run() { clsuite run --stream smollm2-bbc --sharpness cheap --out "$OUT" --quiet "$@"; }
run --strategies naive,sam --seeds 0 --save-model          # saved models: the naive vs SAM landscapes
run --strategies naive,sam --seeds 1
run --strategies 'wiseft,wiseft+sam,replay(general=1),replay(general=1)+sam' --seeds 0
run --strategies 'ewc(general=64),ewc(general=64)+sam,lora,lora+sam' --seeds 0
run --strategies naive,sam --seeds 2
clsuite leaderboard "$OUT" --out leaderboards --sort probe_retention
