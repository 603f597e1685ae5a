#!/usr/bin/env bash
# The inference-speed runs behind docs/BENCHMARKS.md "Inference" and the README's speed table: makes the
# checkpoints, benches them into runs/bench/, copies the JSON files to docs/reports/bench/ and regenerates the tables.
# Run with nothing else on the machine: each `binq bench` measures its engines one after another, in their
# own processes, with the same threads. The checkpoints are quick-protocol runs of the embedded SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BINQ:-.venv/bin/binq}
# arb-group and w11a4 are evaluated (their loaded checkpoints' perplexity can be checked against the
# report); the rest not.
for run in "arb-group:--method arb-group" "billm:--method billm --eval none" "w11:--method w11 --eval none" \
    "gptq2:--method gptq --bits 2 --group-size 128 --eval none" \
    "gptq4-act:--method gptq --bits 4 --group-size 128 --act-order --eval none" \
    "w11a4:--method w11 --act-bits 4 --no-layer-table"; do
    name=${run%%:*}
    [ -f "runs/ckpt/$name/model.safetensors" ] ||
        $B quantize --model smollm2-135m ${run#*:} --quick --out "runs/ckpt/$name"
done
$B bench --model runs/ckpt/arb-group --against original,original-hf,bf16,llamacpp --threads 2 --gemv \
    --json runs/bench/arb-group.json
for name in billm w11 gptq2 gptq4-act w11a4; do
    $B bench --model "runs/ckpt/$name" --against original --threads 2 --json "runs/bench/$name.json"
done
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" benchmarks/tables.py --collect runs/bench
"$PYTHON" benchmarks/tables.py
