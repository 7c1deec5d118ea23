#!/usr/bin/env bash
# The real-run pair (configs/small_gla.py, configs/small_softmax.py) on one GPU; run folders go to runs/,
# results and the plot to ${OUT:-real_run_logs}/. each command takes under ten minutes on an H100:
#   scripts/real_run_eval.sh train small_gla       # training, then the export (about 3 minutes on an H100)
#   scripts/real_run_eval.sh train small_softmax   # (about 4 minutes)
#   scripts/real_run_eval.sh eval small_gla        # the zero-shot table and long_ppl of the export (at most
#   scripts/real_run_eval.sh eval small_softmax    # 8 minutes each); docs/long_ppl.png once both exist
# Wheels carried in .whl/ (grain, ml_collections) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-real_run_logs}
mkdir -p "$out"
source scripts/gpu_env.sh

step() {  # name, seconds, command...: the log keeps everything, the terminal the last lines
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -i "deprecat\|it/s\]\|seq/s\]\|window/s\]" "$out/$name.log" | tail -n "${TAIL:-24}"
  echo "   $name: exit $rc after $((SECONDS - start))s"
}

action=${1:-}
shift
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(small_gla small_softmax)
case $action in
  train)
    for model in "${models[@]}"; do
      TAIL=4 step "train_$model" 450 python3 train.py --config "configs/$model.py" --workdir "runs/$model"
      cp "runs/$model/metrics.jsonl" "$out/${model}_metrics.jsonl" 2>/dev/null
    done ;;
  eval)
    for model in "${models[@]}"; do
      step "eval_$model" 330 python3 eval.py --model "runs/$model/export" --output "runs/$model/eval.json" \
        --no_progress
      TAIL=10 step "long_ppl_$model" 150 python3 eval.py --model "runs/$model/export" --tasks long_ppl \
        --output "runs/$model/long_ppl.json" --no_progress
      for f in eval.json long_ppl.json long_ppl.long_ppl.png; do cp "runs/$model/$f" "$out/${model}_$f" 2>/dev/null; done
    done
    if [ -f runs/small_gla/long_ppl.json ] && [ -f runs/small_softmax/long_ppl.json ]; then
      python3 -m jaxlin.eval.plot_long_ppl --out docs/long_ppl.png GLA=runs/small_gla/long_ppl.json \
        softmax=runs/small_softmax/long_ppl.json && cp docs/long_ppl.png "$out/"
    fi ;;
  *) echo "usage: scripts/real_run_eval.sh train|eval [small_gla small_softmax]" >&2; exit 2 ;;
esac
