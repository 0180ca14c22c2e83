#!/usr/bin/env bash
# The GPU matrix of issue 21: every model eager and compiled, fp16, each run compiled merged
# against compiled unmerged (tokenmerge bench --compile) and eager against eager, every figure in
# one JSON file per run under $OUT (default bench-results/gpu).
#
#   bash benchmarks/gpu_matrix.sh              # on a CUDA machine: the full-size matrix
#   TINY=1 bash benchmarks/gpu_matrix.sh       # the same runs on tiny presets, on the CPU
#
# Needs the repository's .venv (make venv) or tokenmerge and tokenmerge-bench installed.
set -euo pipefail

OUT=${OUT:-bench-results/gpu}
TOKENMERGE=${TOKENMERGE:-$(command -v tokenmerge || echo .venv/bin/tokenmerge)}
mkdir -p "$OUT"

if [[ "${TINY:-0}" == 1 ]]; then
    DEVICE=(--device cpu --dtype float32)
    RUNS=(
        "sd15-1024-b2|--model tiny-unet --batch 2 --rounds 2"
        "sdxl-1024|--model tiny-unet --rounds 2 --set sites.levels=[1,2]"
        "flux-1024|--model tiny-flux --rounds 2"
        "vit-b16-b256|--model tiny-vit --batch 8 --rounds 2"
    )
else
    DEVICE=(--device cuda --dtype float16)
    RUNS=(
        "sd15-1024-b2|--model sd15 --size 1024 --batch 2"
        "sdxl-1024|--model sdxl --size 1024"
        "flux-1024|--model flux-dev-cut --size 1024 --dtype bfloat16"
        "vit-b16-b256|--model vit-b-16 --batch 256"
    )
fi

for run in "${RUNS[@]}"; do
    name=${run%%|*}
    read -r -a options <<< "${run#*|}"
    for mode in eager compiled; do
        extra=()
        [[ $mode == compiled ]] && extra=(--compile)
        echo "== $name, $mode"
        # a later --dtype (flux's bfloat16) overrides the matrix's
        "$TOKENMERGE" bench "${DEVICE[@]}" "${options[@]}" "${extra[@]}" --no-progress \
            --no-plot --json "$OUT/$name-$mode.json" | tee "$OUT/$name-$mode.txt"
    done
done
echo "wrote $OUT"
