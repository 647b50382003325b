#!/usr/bin/env bash
# Remake every committed artefact that depends on the testbed checkpoint, after a new one has been
# copied to harness/testbed/checkpoint (scripts/ship_testbed_checkpoint.py): the testbed codebook, the
# unpruned test-split table, the default protocol with its leaderboard and analyses, the CI regression
# baseline and a history record, and LVPruning's trained modules. About 80 minutes on 2 CPU cores (the codebook probes 1,000 images:
# with 500, the instruct_6 model had no cross-image cluster spanning more than 64 images, the rule of
# METHODS.md §1). Each step's run folder is kept under runs/refresh-<stamp>/.
# The README tables and the per-family thresholds of tests/test_testbed_model.py's
# test_shipped_model_answers_testbed_questions are edited by hand from what this prints (the last step
# shows the unpruned accuracies) and from
# `python scripts/protocol_figures.py results/testbed_default_protocol.csv`.
#
#   bash scripts/refresh_testbed_results.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
H="$VENV/bin/harness"
OUT="runs/refresh-$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$OUT"
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

step "codebook (probes cached per model under runs/codebook-probes/, so a killed build resumes)"
"$H" codebook build --images 1000 --output harness/testbed/codebook/codebook.pt

step "LVPruning's decision modules (trained on the checkpoint they prune; ~25 min; resumes from its workdir)"
"$H" lvpruning train --model harness/testbed/checkpoint --output harness/testbed/lvpruning/modules.safetensors \
    --workdir "$OUT/lvpruning-train"
cp "$OUT/lvpruning-train/train_log.jsonl" harness/testbed/lvpruning/train_log.jsonl

step "unpruned accuracy on the whole test split"
"$H" run --methods none --limit all --timing-repeats 0 --output "$OUT/quality"
cp "$OUT/quality/summary.csv" results/testbed_unpruned_test_split.csv

step "the default protocol (harness run --methods all)"
"$H" run --methods all --output "$OUT/protocol"
cp "$OUT/protocol/summary.csv" results/testbed_default_protocol.csv

step "leaderboard and analyses of the protocol run"
"$H" leaderboard --from "$OUT/protocol" --output results/leaderboard
"$H" analyze consistency "$OUT/protocol"
cp "$OUT/protocol/analysis/ipr_consistency.csv" "$OUT/protocol/analysis/ipr_consistency.png" results/
"$H" codebook analyze --output results/codebook_analysis --run "$OUT/protocol"
"$VENV/bin/python" scripts/published_vs_testbed.py --write   # the testbed columns beside the published rankings

step "CI regression baseline and history"
"$H" regress --ci --write-baseline
"$H" regress --record "$OUT/protocol"

step "done: unpruned test-split accuracy"
grep ',accuracy,' results/testbed_unpruned_test_split.csv
