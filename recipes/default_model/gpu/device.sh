#!/usr/bin/env bash
# Everything the one GPU call runs, from the repository root on the device machine (OUT is set by
# the device tool; .gpu/ was filled by prep.py). Usage: BUDGET=330 recipes/default_model/gpu/device.sh
#  1. train.py: stage 1 + stage 2 of the default model in BUDGET seconds, weights to $OUT;
#  2. that model merged into src/rosim/default_model (of the device's copy), `rosim eval` on STS-B
#     test and ATEC test;
#  3. the supervised + R-Drop experiment (recipes/supervised/experiment.sh) from that model, in the
#     time left before DEADLINE seconds; its results (even partial) to $OUT/supervised.tgz.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-330}
DEADLINE=${DEADLINE:-570}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/rosim_site OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 recipes/default_model/gpu/train.py --budget "$BUDGET" --out "$OUT" ${TINY:+--tiny} || exit 1
echo "training done after $(( $(date +%s) - T0 )) s"

mkdir -p ../shared/data runs/default_model/data /tmp/bin
tar -xzf .gpu/sts-zh.tgz -C ../shared/data
gunzip -c .gpu/distill_pairs.jsonl.gz > runs/default_model/data/distill_pairs.jsonl
printf '#!/bin/sh\nexec python3 -c "import sys; from rosim.cli import main; sys.exit(main(sys.argv[1:]))" "$@"\n' > /tmp/bin/rosim
chmod +x /tmp/bin/rosim
ln -sf "$(command -v python3)" /tmp/bin/python
python3 recipes/default_model/gpu/merge.py "$OUT" src/rosim/default_model --logs /tmp/gpulogs || exit 1
S=../shared/data/sts-zh
timeout 90 /tmp/bin/rosim eval $S/STS-B/test.tsv $S/ATEC/test.tsv -q -o "$OUT/eval_default.json"
cat "$OUT/eval_default.json"
echo "eval done after $(( $(date +%s) - T0 )) s"

LEFT=$(( DEADLINE - ($(date +%s) - T0) ))
BIN=/tmp/bin STEPS=${STEPS:-1500} timeout "$LEFT" recipes/supervised/experiment.sh
tar -czf "$OUT/supervised.tgz" runs/supervised/results $(ls -d runs/supervised/alpha*/log.jsonl runs/supervised/alpha*/distill/log.jsonl 2>/dev/null)
echo "all done after $(( $(date +%s) - T0 )) s"
