#!/usr/bin/env bash
# The CPU RETRO-fitting run whose checkpoint is committed (runs/retro-cpu/): run it again to resume.
#
#   scripts/train_retro_cpu.sh [extra `memlm train retro` options]
#
# The corpus at --max-docs 400 per source (stdlib, man pages, /usr/share/doc), put into a store
# once (memlm's cache, retro/store: ~50k chunks embedded by the store's MiniLM), the neighbours of
# the 2,048 training windows searched once (retro/train-...), then up to 600 steps of 4 x 512 tokens
# (1.2M tokens), checkpoint every 5 steps, held-out loss every 20 (leak-free neighbours, and with
# leakage: the gap is what the copying is worth). Windows whose
# neighbours hold much of what follows come 4x per epoch (--copy-repeat, the default); the states
# below the first CCA layer are cached (memlm's cache, train-hidden/; 1.2 MB per window visited).
# Half the chunks get a near-duplicate passage (the text just before a span of what follows)
# planted at a random place in their first neighbour (--copy-spans 0.5): without those copy
# lessons the gates learn not to copy (session 11's run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/retro-cpu}
resume=()
[ -d "$OUT_DIR/checkpoint" ] && resume=(--resume)
exec .venv/bin/memlm train retro --device cpu --out "$OUT_DIR" --max-docs 400 --train-windows 2048 \
    --steps 600 --batch 4 --micro-batch 2 --seq 512 --lr 1e-3 --warmup 10 \
    --eval-every 20 --eval-windows 8 --checkpoint-every 5 --copy-repeat 4 --copy-spans 0.5 --cache-hidden --threads 2 "${resume[@]}" "$@"
