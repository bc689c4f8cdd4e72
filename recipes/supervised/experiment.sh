#!/usr/bin/env bash
# The supervised-enhancement experiment: from the embedded default model, phase 1 (SBERT head on
# STS-B train + ATEC/BQ/LCQMC valid; never a test split) without and with R-Drop (alpha = 4), each
# followed by the distillation back into a generator (phase 2). Every model is scored with
# `rosim eval` on STS-B test and ATEC test, and with `rosim sim` on two negation pairs.
# Results: runs/supervised/results/*.json and results.md (the table). Re-running skips what is done.
# Usage: recipes/supervised/experiment.sh   (STEPS=... phase 1's steps, default 1000; MODEL=... the
# starting checkpoint, default the embedded model; BIN=... where rosim and python are, default .venv/bin)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
R=recipes/supervised
D=${D:-runs/supervised}
S=${S:-../shared/data/sts-zh}  # where the two test files are read from
STEPS=${STEPS:-1000}
DISTILL_STEPS=${DISTILL_STEPS:-200}
mkdir -p "$D/results"

score() {  # NAME MODEL_DIR
  local out="$D/results/$1.json"
  [ -f "$out" ] && return
  $BIN/rosim eval "$S/STS-B/test.tsv" "$S/ATEC/test.tsv" -m "$2" -q -o "$D/results/$1.eval.json" > /dev/null
  local n1 n2
  n1=$($BIN/rosim sim "我喜欢北京" "我不喜欢北京" -m "$2")
  n2=$($BIN/rosim sim "今天天气不错" "今天天气不好" -m "$2")
  $BIN/python - "$D/results/$1.eval.json" "$out" "$1" "$n1" "$n2" <<'PY'
import json, sys
ev, out, name, n1, n2 = sys.argv[1:]
res = {"/".join(r["file"].split("/")[-2:]): r["spearman"] for r in json.load(open(ev))["results"]}
json.dump({"name": name, "spearman": res, "negation": {"我喜欢北京/我不喜欢北京": float(n1),
           "今天天气不错/今天天气不好": float(n2)}}, open(out, "w"), ensure_ascii=False, indent=1)
PY
}

MODEL=${MODEL:-src/rosim/default_model}  # the starting point ([model] init of supervised.toml)
score before "$MODEL"
sup() {  # ALPHA [--no-distill]: phase 1 (and phase 2 unless --no-distill); resumes or skips what is done
  $BIN/rosim train supervised -c $R/supervised.toml -q --resume "${@:2}" --set "model.init=\"$(realpath "$MODEL")\"" \
      --set "train.out_dir=\"$PWD/$D/alpha$1\"" --set "train.steps=$STEPS" --set "supervised.rdrop_alpha=$1" \
      --set "distill.train.steps=$DISTILL_STEPS"
}
for alpha in 0 4; do  # both phase-1 models first: the with/without R-Drop comparison is the point
  [ -d "$D/alpha$alpha/final" ] || sup $alpha --no-distill
  score "sup_alpha$alpha" "$D/alpha$alpha/final"
done
for alpha in 0 4; do
  [ -d "$D/alpha$alpha/distill/final" ] || sup $alpha
  score "sup_alpha${alpha}_distilled" "$D/alpha$alpha/distill/final"
done

$BIN/python - "$D/results" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
names = [("before", "default model (before)"), ("sup_alpha0", "supervised, no R-Drop"),
         ("sup_alpha4", "supervised, R-Drop α=4"), ("sup_alpha0_distilled", "no R-Drop, distilled into generator"),
         ("sup_alpha4_distilled", "R-Drop α=4, distilled into generator")]
lines = ["| model | STS-B test | ATEC test | cos(我喜欢北京, 我不喜欢北京) | cos(今天天气不错, 今天天气不好) |",
         "|---|---|---|---|---|"]
for key, label in names:
    if not (d / f"{key}.json").is_file():
        lines.append(f"| {label} | not run | | | |")
        continue
    r = json.loads((d / f"{key}.json").read_text())
    s, n = r["spearman"], list(r["negation"].values())
    lines.append(f"| {label} | {s['STS-B/test.tsv']:.2f} | {s['ATEC/test.tsv']:.2f} | {n[0]:.3f} | {n[1]:.3f} |")
(d / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
print("\n".join(lines))
PY
