#!/usr/bin/env bash
# The training runs behind docs/results/int8 (run from the repository root; one job at a time).
set -euo pipefail
OUT=${OUT:-runs/int8}
ACNET=${ACNET:-.venv/bin/acnet}
run() {  # run DIR ARGS...: train into DIR, or finish an interrupted run
  local d=$1; shift
  if [ -f "$d/metrics.json" ]; then return; fi
  if [ -f "$d/config.json" ]; then $ACNET train "$@" --quiet --out "$d" --resume
  else $ACNET train "$@" --quiet --out "$d"; fi
}
CQ=(--model cifar_quick --dataset fashion-mnist --epochs 3 --train-limit 20000 --lr 0.05 --nesterov)
for seed in 0 1 2; do
  run "$OUT/cq-base-s$seed" "${CQ[@]}" --block base --seed "$seed"
  run "$OUT/cq-acb-s$seed" "${CQ[@]}" --block acb --seed "$seed"
  run "$OUT/cq-online-s$seed" "${CQ[@]}" --block acb --no-branch-bn --branch-scale --seed "$seed"
done
R20=(--model resnet20 --dataset fashion-mnist --epochs 4 --train-limit 12000 --lr 0.05)
for seed in 0 1 2; do
  run "$OUT/r20-base-s$seed" "${R20[@]}" --block base --seed "$seed"
  run "$OUT/r20-acb-s$seed" "${R20[@]}" --block acb --seed "$seed"
done
