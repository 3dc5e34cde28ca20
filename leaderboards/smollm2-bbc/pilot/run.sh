#!/usr/bin/env bash
# The commands that produced this leaderboard (2-core CPU). Re-running skips the runs already recorded; the
# first two lines are the cells of `make demo` (its records can be copied here and are then skipped).
set -euo pipefail
OUT=${OUT:-runs/smollm2}
run() { clsuite run --stream smollm2-bbc --out "$OUT" --quiet "$@"; }
run --strategies naive,sam --seeds 0,1
run --strategies wiseft+sam --seeds 0
run --strategies 'wiseft,replay(general=1),replay(general=1)+sam,ewc(general=64),ewc(general=64)+sam,lora,lora+sam' --seeds 0
run --strategies naive,sam --seeds 2
clsuite leaderboard "$OUT" --out leaderboards --sort probe_retention
