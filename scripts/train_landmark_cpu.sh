#!/usr/bin/env bash
# The CPU landmark training run whose checkpoint is committed (runs/landmark-cpu-2/): run it again to
# resume.
#
#   scripts/train_landmark_cpu.sh [extra `memlm train landmark` options]
#
# The whole training corpus (stdlib docstrings, man pages, /usr/share/doc: ~8.7M train tokens),
# windows of 512 tokens: 7 blocks of 64 as memory, then 64 local tokens that read them only
# through their landmarks (grouped softmax at every layer but the first); 200 steps of 8 windows
# (0.8M tokens), held-out loss every 20 steps, checkpoint every 5. The first evaluation also logs
# the local tokens' loss without memory and with the whole window in context. The memory's first
# 4 rows are left out, as the service leaves out each build window's first rows (the attention
# sinks); runs/landmark-cpu/ is the earlier run that kept them (the shipped weights, step 160).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/landmark-cpu-2}
resume=()
[ -d "$OUT_DIR/checkpoint" ] && resume=(--resume)
exec .venv/bin/memlm train landmark --device cpu --out "$OUT_DIR" \
    --steps 200 --batch 8 --micro-batch 4 --seq 512 --local 64 --lr 2e-3 --warmup 20 \
    --eval-every 20 --eval-windows 16 --checkpoint-every 5 --threads 2 "${resume[@]}" "$@"
