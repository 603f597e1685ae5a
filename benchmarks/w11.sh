#!/usr/bin/env bash
# W(1+1)A(1x4) runs of docs/W11.md, quick protocol, one after another; a run whose report exists is skipped.
# Usage: benchmarks/w11.sh [name ...]   (default: all, in priority order). Reports in runs/w11/<name>/.
set -u
OUT=${OUT:-runs/w11}
BINQ=${BINQ:-.venv/bin/binq}
declare -A RUNS=(
  [w11_default]="quantize --method w11 --importance obs"
  [w11_a4]="quantize --method w11 --importance obs --act-bits 4 --smooth none"
  [gptq2_a4]="quantize --method gptq --bits 2 --group-size 128 --act-bits 4 --smooth none"
  [w16_a4]="eval --act-bits 4 --smooth none"
  [w11_a4_smooth]="quantize --method w11 --importance obs --act-bits 4 --smooth channel"
  [w16_a4_smooth]="eval --act-bits 4 --smooth channel"
  [w11_init_median]="quantize --method w11 --importance obs --init median"
  [w11_offsets]="quantize --method w11 --importance obs --offsets"
  [w11_importance_diag]="quantize --method w11 --importance diag"
  [w11_importance_review]="quantize --method w11 --importance review"
  [w11_no_em]="quantize --method w11 --importance obs --em-iterations 0"
  [w11_init_salience]="quantize --method w11 --importance obs --init salience"
  [w11_a4_token]="quantize --method w11 --importance obs --act-bits 4 --smooth token"
  [w11_a4_sym]="quantize --method w11 --importance obs --act-bits 4 --act-sym"
  [w11_a4_noclip]="quantize --method w11 --importance obs --act-bits 4 --act-clip 1.0"
)
ORDER=(w11_default w11_a4 gptq2_a4 w16_a4 w11_a4_smooth w16_a4_smooth w11_init_median w11_offsets
  w11_importance_diag w11_importance_review w11_no_em w11_init_salience w11_a4_token w11_a4_sym w11_a4_noclip)
[ $# -gt 0 ] && ORDER=("$@")
mkdir -p "$OUT"
for name in "${ORDER[@]}"; do
  args=${RUNS[$name]}
  if [ -e "$OUT/$name/report.json" ] || [ -e "$OUT/$name.done" ]; then continue; fi
  echo "$(date -u +%T) $name: binq $args --model smollm2-135m --quick"
  start=$(date +%s)
  if [[ $args == quantize* ]]; then
    $BINQ $args --model smollm2-135m --quick --label "$name" --out "$OUT/$name" --no-progress --no-layer-table \
      > "$OUT/$name.log" 2>&1
  else
    $BINQ $args --model smollm2-135m --quick --no-progress > "$OUT/$name.log" 2>&1 && touch "$OUT/$name.done"
  fi
  echo "$(date -u +%T) $name: exit $? after $(( $(date +%s) - start )) s"
done
