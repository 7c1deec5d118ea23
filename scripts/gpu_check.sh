#!/usr/bin/env bash
# On a GPU machine, in one run: compiled kernel tests, the kernel benchmarks and the train-step benchmark,
# each bounded in time so that one slow stage cannot eat the others; full logs and JSON go to
# ${OUT:-gpu_logs}/. Wheels carried in .whl/ (grain, ml_collections, ...) are installed first; those in
# .whl/reference/ (FLA and its dependencies) go to a folder of their own, on PYTHONPATH only for the `reference`
# and `attention-layer` stages: transformers inside FLA breaks with the project's safetensors.
#   scripts/gpu_check.sh [STAGE ...]    STAGE: tests, delta-tests, gelu-tests, elementwise-tests, gla, delta,
#   gelu, elementwise, train, train-xla-norms, train-xla-mlp, train-delta, train-all, profile, reference,
#   attention-tests, train-softmax, seq-sweep, seq-sweep-recurrent, attention-layer, long-train, fp8, fp8-run,
#   fp8-profile, decode-tests, decode, decode-ops, decode-autotune, decode-prefill
#   (default: tests, delta-tests, gelu-tests, gla, delta, gelu, train)
# `tests` runs the GLA Mosaic and bf16 cases (15 tests, about 5 minutes on an H200 with both Mosaic kernels
# compiling), so give it a stage of its own where time is short. `delta-tests` runs the
# delta rules' Mosaic and bf16 cases, `gelu-tests` the MLP's fused GELU products at GPT-2 Medium's shape,
# `elementwise-tests` the short convs', gated norm's and LayerNorm's kernels. `reference` times the PyTorch
# reference's step (jaxlin.bench.reference); `reference train` puts it beside ours, same GPU, same run.
# `fp8` times the GPT-2 Medium GLA step at model.matmul_precision bf16 then fp8 on the same GPU (about 5 minutes); `fp8-run` trains
# configs/small_gla.py for its 2,200 steps at bf16 and fp8 side by side on the one GPU (about 5 minutes on an
# H100; the losses are the comparison, not the speed) on the corpus in $JAXLIN_DATA_DIR and plots both curves into
# fp8_loss.png; `long-train` runs configs/small_gla_8k.py and small_softmax_8k.py side by side likewise. Each of a
# pair gets PAIR_MEM_FRACTION (default 0.45) of the GPU's memory. `fp8-profile` prints where the fp8 step's
# time goes, kernel by kernel (`profile` does the same at bf16); `decode-tests` compiles the fused decode step
# (kernels/decode_step.py) and the one-row MLP kernel (kernels/decode_mlp.py) at GPT-2 Medium's width against
# the layers' XLA ops; `decode-autotune` times the batch-1 and batch-64 rows at 1k decoded with XLA's exhaustive
# tiling search (`--exhaustive_autotune`, 77-87 s of compiling for GLA) beside the default; `decode` runs the decode
# benchmark's grid from empty states (no prefill), each model's first row profiled (about 1.5 minutes on an H100);
# `decode-ops` runs the recurrent models' rows again with their decode step in the layers' XLA ops (`--impl reference`);
# `decode-prefill` adds the prefill and the naive full-forward columns at batch 1, context 1k (the prefill's
# Pallas kernels take minutes to compile: 312 s for GLA's functions at three batch sizes on an H100).
set -uo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests delta-tests gelu-tests gla delta gelu train)
known=" tests delta-tests gelu-tests elementwise-tests gla delta gelu elementwise train train-xla-norms train-xla-mlp "
known+="train-delta train-all profile reference attention-tests train-softmax seq-sweep seq-sweep-recurrent "
known+="attention-layer long-train fp8 fp8-run fp8-profile decode-tests decode decode-ops decode-autotune "
known+="decode-prefill "
for name in "${stages[@]}"; do  # every name checked before any stage runs
  [[ "$known" == *" $name "* ]] || { echo "error: unknown stage '$name' (expected one of:$known)" >&2; exit 2; }
done
out=${OUT:-gpu_logs}
mkdir -p "$out"
source scripts/gpu_env.sh

install_reference_wheels() {  # .whl/reference/ (FLA) into /tmp/reference_site, once
  [ -d /tmp/reference_site ] && return 0
  if ! compgen -G ".whl/reference/*.whl" >/dev/null; then
    echo "   no FLA wheels in .whl/reference/ (pip download flash-linear-attention there): FLA rows skipped"
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/reference_site \
    .whl/reference/*.whl || { echo "error: installing .whl/reference/*.whl failed" >&2; exit 1; }
}

stage() {  # name, seconds, command...: the log keeps everything, the terminal the last lines
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s)"
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -i "deprecat\|return rule" "$out/$name.log" | tail -n 14
  if [ "$rc" -eq 124 ]; then echo "   $name: stopped after ${seconds}s"; fi
}

pair_fraction=${PAIR_MEM_FRACTION:-0.45}  # each of the two runs that share the GPU
train_beside() {  # name, train.py arguments...: in the background, one of two runs sharing the GPU; workdir
  local name=$1   # /tmp/runs/NAME (started afresh), metrics copied to $out/NAME.metrics.jsonl once it ends
  shift
  rm -rf "/tmp/runs/$name"
  (XLA_PYTHON_CLIENT_MEM_FRACTION=$pair_fraction stage "$name" 420 python3 train.py --workdir "/tmp/runs/$name" "$@"
   cp "/tmp/runs/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null) &
}
shapes="--shape 32,1024,16,32,64 --shape 32,1024,16,64,64 --shape 8,4096,16,64,64"
for name in "${stages[@]}"; do
  case $name in
    tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage tests 360 python3 -m pytest tests/kernels/test_gla.py \
             -k "mosaic or bf16" -vv -p no:cacheprovider -W ignore ;;
    gelu-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage gelu-tests 120 python3 -m pytest \
             tests/kernels/test_gelu_matmul.py -vv -p no:cacheprovider -W ignore ;;
    gelu) stage gelu 150 python3 -m jaxlin.bench.gelu --json "$out/gelu.json" ;;
    elementwise-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage elementwise-tests 360 python3 -m pytest \
             tests/kernels/test_gated_norm.py tests/kernels/test_short_conv.py tests/kernels/test_layer_norm.py \
             -vv -p no:cacheprovider -W ignore ;;
    elementwise) stage elementwise 180 python3 -m jaxlin.bench.elementwise --conv_tiles 4,256,32,4 \
             --conv_tiles 8,512,16,8 --json "$out/elementwise.json" ;;  # + two other walk tilings
    gla) stage gla 150 python3 -m jaxlin.bench.kernels --op gla $shapes --impls pallas:triton,pallas:mosaic --json "$out/gla.json" ;;
    delta-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage delta-tests 300 python3 -m pytest tests/kernels/test_delta.py \
             -k "mosaic or bf16" -vv -p no:cacheprovider -W ignore ;;
    delta) stage delta 240 bash -c "python3 -m jaxlin.bench.kernels --op delta_rule --shape 32,1024,16,64,64 \
             --impls pallas:triton,pallas:mosaic --json $out/delta_rule.json && python3 -m jaxlin.bench.kernels \
             --op gated_delta_rule --shape 32,1024,16,64,64 --shape 4,2048,16,128,128 \
             --impls pallas:triton,pallas:mosaic --json $out/gated_delta_rule.json" ;;
    train) stage train 180 python3 -m jaxlin.bench.train_step --steps 10 --nophases --config configs/gpt2_medium_gla.py --json "$out/train.json" ;;
    train-xla-norms) stage train-xla-norms 180 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
             --config configs/gpt2_medium_gla.py --config.model.layer_norm_impl=xla --json "$out/train_xla_norms.json" ;;  # the A/B without the LayerNorm kernel
    train-xla-mlp) stage train-xla-mlp 180 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
             --config configs/gpt2_medium_gla.py --config.model.mlp_impl=xla --json "$out/train_xla_mlp.json" ;;  # bf16 without the fused GELU MLP, as fp8 runs it
    train-delta) for impl in pallas:triton pallas:mosaic; do  # the delta kernels' two backends, paired
             stage "train-delta-${impl#pallas:}" 180 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
               --config configs/gpt2_medium_gated_deltanet.py --config.model.impl=$impl \
               --json "$out/train_delta_${impl#pallas:}.json"
           done ;;
    train-all) for config in gla deltanet gated_deltanet hybrid softmax; do  # every GPT-2 Medium config
             # one log each, and one JSON line each in train_all.jsonl
             rm -f "/tmp/train_$config.json"
             stage "train-$config" 150 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
               --config "configs/gpt2_medium_$config.py" --json "/tmp/train_$config.json"
             [ -f "/tmp/train_$config.json" ] && python3 -c "import json, sys
print(json.dumps({'config': sys.argv[2], **json.load(open(sys.argv[1]))}))" "/tmp/train_$config.json" "$config" \
               >>"$out/train_all.jsonl"
           done ;;
    profile) stage profile 240 python3 -m jaxlin.bench.train_step --steps 10 --nophases --config configs/gpt2_medium_gla.py \
               --profile /tmp/gla_profile --json "$out/profile.json"
             gzip -c /tmp/gla_profile/train_step.hlo.txt >"$out/profile_hlo.txt.gz" ;;  # fusions -> source lines
    fp8-profile) stage fp8-profile 240 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
               --config configs/gpt2_medium_gla.py --config.model.matmul_precision=fp8 \
               --profile /tmp/fp8_profile --json "$out/fp8_profile.json" ;;  # where the fp8 step's time goes
    decode-tests) JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 stage decode-tests 480 python3 -m pytest \
             tests/kernels/test_decode_step.py tests/kernels/test_decode_mlp.py -vv -p no:cacheprovider -W ignore \
             -k "not lowers" ;;
    decode-ops) stage decode-ops 200 python3 -m jaxlin.bench.decode --decode_only --impl reference \
             --models gla,gated_deltanet --time_budget 150 --json "$out/decode_ops.json" ;;
    decode-autotune)
      for tuning in exhaustive default; do  # the same rows, one compile each way, on the same GPU
        flag=$([ $tuning = exhaustive ] && echo --exhaustive_autotune)
        stage "decode-$tuning" 480 python3 -m jaxlin.bench.decode --decode_only $flag --batch 1,64 --context 1024 \
          --models gla,gated_deltanet,softmax --time_budget 450 --json "$out/decode_$tuning.json"
      done ;;
    decode) stage decode 240 python3 -m jaxlin.bench.decode --decode_only --time_budget 180 \
               --profile /tmp/decode_profile --json "$out/decode.json" ;;  # the whole grid; each model's first row profiled
    decode-prefill) stage decode-prefill 1200 python3 -m jaxlin.bench.decode --batch 1 --context 1024 \
               --time_budget 1100 --json "$out/decode_prefill.json" ;;
    reference)
      install_reference_wheels || continue
      PYTHONPATH=/tmp/reference_site:$PWD stage reference 240 python3 -m jaxlin.bench.reference --steps 10 \
        --json "$out/reference.json" ;;
    attention-tests) JAX_PLATFORMS=cuda stage attention-tests 300 python3 -m pytest tests/ops/test_attention.py \
             -vv -p no:cacheprovider -W ignore ;;  # cuDNN attention against XLA's, values and gradients
    train-softmax) for run in gla:gla softmax:softmax softmax_xla:softmax; do  # GLA beside fused and XLA softmax
             label=${run%%:*} config=${run#*:} extra=()
             [ "$label" = softmax_xla ] && extra=(--config.model.attention_impl=xla)
             stage "train-$label" 150 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
               --config "configs/gpt2_medium_$config.py" "${extra[@]}" --json "$out/train_$label.json"
           done ;;
    seq-sweep) stage seq-sweep 570 python3 -m jaxlin.bench.seq_sweep --configs gla,softmax --budget 530 \
             --json "$out/seq_sweep.json" ;;
    seq-sweep-recurrent) stage seq-sweep-recurrent 570 python3 -m jaxlin.bench.seq_sweep \
             --configs gated_deltanet,hybrid --budget 530 --json "$out/seq_sweep_recurrent.json" ;;
    attention-layer) install_reference_wheels  # FLA's chunk_gla beside ours, when carried
             PYTHONPATH=$PYTHONPATH:/tmp/reference_site stage attention-layer 420 python3 -m jaxlin.bench.attention_layer \
             --json "$out/attention_layer.json" ;;
    long-train) for config in small_gla_8k small_softmax_8k; do  # short long-context runs side by side
             train_beside "$config" --config "configs/$config.py"
           done
           wait
           python3 -m jaxlin.train.metrics --out "$out/long_context_loss.png" \
             GLA="$out/small_gla_8k.metrics.jsonl" softmax="$out/small_softmax_8k.metrics.jsonl" ;;
    fp8) for precision in bf16 fp8; do  # one after the other on the same GPU
           stage "train-$precision" 180 python3 -m jaxlin.bench.train_step --steps 10 --nophases \
             --config configs/gpt2_medium_gla.py --config.model.matmul_precision=$precision \
             --json "$out/train_$precision.json"
         done
         [ -f "$out/train_bf16.json" ] && [ -f "$out/train_fp8.json" ] && python3 -c "import json, sys
r = {p: json.load(open(f'{sys.argv[1]}/train_{p}.json')) for p in ('bf16', 'fp8')}
print('fp8 / bf16: %.3fx tokens/s, peak memory %.1f -> %.1f GiB' % (r['fp8']['tokens_per_s'] / r['bf16']['tokens_per_s'],
      r['bf16']['peak_memory_gib'], r['fp8']['peak_memory_gib']))" "$out" ;;
    fp8-run) for precision in bf16 fp8; do  # the learning comparison: both full runs side by side, both curves
           train_beside "small_gla_$precision" --config configs/small_gla.py --config.model.matmul_precision=$precision
         done
         wait
         [ -f "$out/small_gla_bf16.metrics.jsonl" ] && [ -f "$out/small_gla_fp8.metrics.jsonl" ] || continue
         python3 -m jaxlin.train.metrics --out "$out/fp8_loss.png" "bf16=$out/small_gla_bf16.metrics.jsonl" \
           "fp8=$out/small_gla_fp8.metrics.jsonl"
         python3 -c "import json, sys
rows = {p: list(map(json.loads, open(f'{sys.argv[1]}/small_gla_{p}.metrics.jsonl'))) for p in ('bf16', 'fp8')}
val = {p: [r['val_loss'] for r in rows[p] if 'val_loss' in r] for p in rows}
bad = {p: max((r.get('nonfinite_total', 0) for r in rows[p]), default=0) for p in rows}
if not all(val.values()):
    sys.exit('a run stopped before its first validation: see its log')
print('final val loss: bf16 %.4f, fp8 %.4f (%+.2f %%); non-finite steps: bf16 %d, fp8 %d' % (val['bf16'][-1],
      val['fp8'][-1], 100 * (val['fp8'][-1] / val['bf16'][-1] - 1), bad['bf16'], bad['fp8']))" "$out" ;;
  esac
done
