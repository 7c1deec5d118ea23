#!/usr/bin/env bash
# On a GPU machine, in one call: compiled kernel tests, the kernel benchmarks and the train-step benchmark,
# each bounded in time so that one slow stage cannot eat the others; full logs and JSON go to
# ${OUT:-gpu_logs}/. Wheels carried in .whl/ (grain, ml_collections, FLA, ...) are installed first.
#   scripts/gpu_check.sh [STAGE ...]    STAGE: tests, delta-tests, gelu-tests, elementwise-tests, gla, delta,
#   gelu, elementwise, train, train-xla-norms, train-delta, train-all, profile, attention-tests,
#   train-softmax, seq-sweep, seq-sweep-recurrent, attention-layer, long-train (default: tests, delta-tests,
#   gelu-tests, gla, delta, gelu, train)
# `tests` runs the GLA Mosaic and bf16 cases (15 tests, about 5 minutes on an H200 with both Mosaic kernels
# compiling), so run it alone or with one other stage: a call gets 10 minutes. `delta-tests` runs the
# delta rules' Mosaic and bf16 cases, `gelu-tests` the MLP's fused GELU products at GPT-2 Medium's shape,
# `elementwise-tests` the short convs', gated norm's and LayerNorm's kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1

stage() {  # name, seconds, command...: the log keeps everything, the terminal the last lines
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s)"
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -i "deprecat\|return rule" "$out/$name.log" | tail -n 14
  if [ "$rc" -eq 124 ]; then echo "   $name: stopped after ${seconds}s"; fi
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests delta-tests gelu-tests gla delta gelu train)
shapes="--shape 32,1024,16,32,64 --shape 32,1024,16,64,64 --shape 8,4096,16,64,64"
for name in "${stages[@]}"; do
  case $name in
    tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage tests 360 python3 -m pytest tests/kernels/test_gla.py \
             -k "mosaic or bf16" -vv -p no:cacheprovider -W ignore ;;
    gelu-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage gelu-tests 120 python3 -m pytest \
             tests/kernels/test_gelu_matmul.py -vv -p no:cacheprovider -W ignore ;;
    gelu) stage gelu 150 python3 -m kernels.bench_gelu --json "$out/gelu.json" ;;
    elementwise-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage elementwise-tests 360 python3 -m pytest \
             tests/kernels/test_gated_norm.py tests/kernels/test_short_conv.py tests/kernels/test_layer_norm.py \
             -vv -p no:cacheprovider -W ignore ;;
    elementwise) stage elementwise 180 python3 -m kernels.bench_elementwise --conv-tiles 4,256,32,4 8,512,16,8 \
             --json "$out/elementwise.json" ;;  # + two other walk tilings
    gla) stage gla 150 python3 -m kernels.bench gla $shapes --impls pallas:triton,pallas:mosaic --json "$out/gla.json" ;;
    delta-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage delta-tests 300 python3 -m pytest tests/kernels/test_delta.py \
             -k "mosaic or bf16" -vv -p no:cacheprovider -W ignore ;;
    delta) stage delta 240 bash -c "python3 -m kernels.bench delta_rule --shape 32,1024,16,64,64 \
             --impls pallas:triton,pallas:mosaic --json $out/delta_rule.json && python3 -m kernels.bench \
             gated_delta_rule --shape 32,1024,16,64,64 --shape 4,2048,16,128,128 \
             --impls pallas:triton,pallas:mosaic --json $out/gated_delta_rule.json" ;;
    train) stage train 180 python3 -m jaxlin.train.bench --steps 10 --nophases --config configs/gpt2_medium_gla.py --json "$out/train.json" ;;
    train-xla-norms) stage train-xla-norms 180 python3 -m jaxlin.train.bench --steps 10 --nophases \
             --config configs/gpt2_medium_gla.py --config.model.layer_norm_impl=xla --json "$out/train_xla_norms.json" ;;  # the A/B without the LayerNorm kernel
    train-delta) for impl in pallas:triton pallas:mosaic; do  # the delta kernels' two backends, paired
             stage "train-delta-${impl#pallas:}" 180 python3 -m jaxlin.train.bench --steps 10 --nophases \
               --config configs/gpt2_medium_gated_deltanet.py --config.model.impl=$impl \
               --json "$out/train_delta_${impl#pallas:}.json"
           done ;;
    train-all) for config in gla deltanet gated_deltanet hybrid softmax; do  # every GPT-2 Medium config
             # one log each and one JSON line each in train_all.jsonl: a device call returns 8 files at most
             rm -f "/tmp/train_$config.json"
             stage "train-$config" 150 python3 -m jaxlin.train.bench --steps 10 --nophases \
               --config "configs/gpt2_medium_$config.py" --json "/tmp/train_$config.json"
             [ -f "/tmp/train_$config.json" ] && python3 -c "import json, sys
print(json.dumps({'config': sys.argv[2], **json.load(open(sys.argv[1]))}))" "/tmp/train_$config.json" "$config" \
               >>"$out/train_all.jsonl"
           done ;;
    profile) stage profile 240 python3 -m jaxlin.train.bench --steps 10 --nophases --config configs/gpt2_medium_gla.py \
               --profile /tmp/gla_profile --json "$out/profile.json"
             gzip -c /tmp/gla_profile/train_step.hlo.txt >"$out/profile_hlo.txt.gz" ;;  # fusions -> source lines
    attention-tests) JAX_PLATFORMS=cuda stage attention-tests 300 python3 -m pytest tests/ops/test_attention.py \
             -vv -p no:cacheprovider -W ignore ;;  # cuDNN attention against XLA's, values and gradients
    train-softmax) for run in gla:gla softmax:softmax softmax_xla:softmax; do  # GLA beside fused and XLA softmax
             label=${run%%:*} config=${run#*:} extra=()
             [ "$label" = softmax_xla ] && extra=(--config.model.attention_impl=xla)
             stage "train-$label" 150 python3 -m jaxlin.train.bench --steps 10 --nophases \
               --config "configs/gpt2_medium_$config.py" "${extra[@]}" --json "$out/train_$label.json"
           done ;;
    seq-sweep) stage seq-sweep 570 python3 -m jaxlin.bench.seq_sweep --configs gla,softmax --budget 530 \
             --json "$out/seq_sweep.json" ;;
    seq-sweep-recurrent) stage seq-sweep-recurrent 570 python3 -m jaxlin.bench.seq_sweep \
             --configs gated_deltanet,hybrid --budget 530 --json "$out/seq_sweep_recurrent.json" ;;
    attention-layer) stage attention-layer 420 python3 -m jaxlin.bench.attention_layer \
             --json "$out/attention_layer.json" ;;
    long-train) for config in small_gla_8k small_softmax_8k; do  # a short long-context run each; loss in metrics
             stage "$config" 280 python3 train.py --config "configs/$config.py" --workdir "/tmp/runs/$config"
             cp "/tmp/runs/$config/metrics.jsonl" "$out/$config.metrics.jsonl" 2>/dev/null
           done
           python3 -m jaxlin.train.metrics --out "$out/long_context_loss.png" \
             GLA=/tmp/runs/small_gla_8k/metrics.jsonl softmax=/tmp/runs/small_softmax_8k/metrics.jsonl ;;
    *) echo "error: unknown stage '$name' (expected tests, delta-tests, gelu-tests, elementwise-tests, gla, delta," \
            "gelu, elementwise, train, train-xla-norms, train-delta, train-all, profile, attention-tests," \
            "train-softmax, seq-sweep, seq-sweep-recurrent, attention-layer or long-train)" >&2; exit 2 ;;
  esac
done
