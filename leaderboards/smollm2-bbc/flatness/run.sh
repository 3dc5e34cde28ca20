#!/usr/bin/env bash
# The commands that produced this folder (2-core CPU; run them alone: SmolLM2 is slow on shared cores).
# Re-running skips the runs already recorded. Every run measures sharpness after training (--sharpness cheap).
set -euo pipefail
OUT=${OUT:-runs/smollm2-sharp}
HERE=leaderboards/smollm2-bbc/flatness
run() { clsuite run --stream smollm2-bbc --out "$OUT" --quiet --sharpness cheap "$@"; }
land() {  # 11x11 filter-normalized surface on 8 BBC training rows around a saved model; $2: span
  clsuite landscape --checkpoint "$OUT/smollm2-bbc/$1/seed0.model" --stream smollm2-bbc --task bbc_topics \
    --split train --n 8 --grid 11 --span "$2" --out "$HERE/landscape-$1-seed0$3" --quiet
}
run --strategies naive,sam --seeds 0 --save-model
land naive 1.0 ""
land sam 1.0 ""
land naive 0.1 -span0.1
land sam 0.1 -span0.1
for suffix in "" -span0.1; do
  clsuite landscape-compare "$HERE"/landscape-{naive,sam}-seed0$suffix/bbc_topics-train.json \
    --out "$HERE/landscape-naive-vs-sam-seed0$suffix.png"
done
run --strategies naive,sam --seeds 1,2
run --strategies 'wiseft,wiseft+sam,replay(general=1),ewc(general=64)' --seeds 0
clsuite sweep "$HERE/steps32.yaml" --out "$OUT"
clsuite sweep "$HERE/rho.yaml" --out "$OUT"
run --strategies 'replay(general=1)+sam,ewc(general=64)+sam' --seeds 0
clsuite correlate "$OUT/smollm2-bbc" --out "$HERE"
clsuite leaderboard "$OUT" --out "$HERE" --sort probe_retention
