#!/usr/bin/env bash
# The GPU checks and rows of issue 31 (BENCHMARKS.md, "GPU"), one command, one results file:
#
#   benchmarks/gpu.sh RESULTS.md [STEP ...]
#
# Steps, in the order they matter (default: all): tests (tests/test_cuda.py), sdpa (the SDPA
# kernel of every block per fusion, and the size bias as a mask against riding in the keys),
# eager (bf16 at batch 256 and 64, keep 0.7 and 0.5, both fusions, DeiT-S and SigLIP B/16),
# profile (kernel time by operator), compile (torch.compile at batch 256), cudagraphs
# (reduce-overhead at batch 1, SigLIP B/16), train (timm's train.py --amp --torchcompile for one
# epoch of the cluttered digits, EViT beside timm's model, then validate.py).
#
# The run keeps to a budget (GPU_SH_BUDGET_S, default 450 s, under the 8 minutes a device session
# can give it): a step that would start with less than its estimate left is skipped with a line
# saying so (run it again by name), and every command stops where the budget ends.
# Runs from the repository's root with this checkout importable, on the machine's own torch and
# timm (PYTHON: the interpreter, default python3). Exits 1 where any command failed, after the
# rest. train needs timm's train.py and validate.py (timm's repository has them, its package not)
# in the folder TIMM_SCRIPTS, and scikit-learn; without them it says so.
# GPU_SH_SMOKE=1: the same commands on the CPU at toy sizes, torch.compile disabled
# (tests/test_gpu_script.py runs it, so that no typo waits for a GPU).
set -u
results=${1:?usage: benchmarks/gpu.sh RESULTS.md [STEP ...]}
shift
steps=${*:-tests sdpa eager profile compile cudagraphs train}
results=$(cd "$(dirname "$results")" && pwd)/$(basename "$results")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
deadline=$((SECONDS + ${GPU_SH_BUDGET_S:-450}))
python=${PYTHON:-python3}
failed=$(mktemp)   # (the steps run in pipelines' subshells: a failure is written down here)
trap 'rm -f "$failed"' EXIT

if [ -n "${GPU_SH_SMOKE:-}" ]; then
  device=cpu big=2 mid=2 one=1 reps=2 many=2 warm=1 epochs=1 iters=1 copies=1
  tiny=(img_size=32 patch_size=8 depth=4 embed_dim=64 num_heads=2 "reorg_layers=(1,2)")
  img=(--img-size 32)
  export TORCH_COMPILE_DISABLE=1
else
  device=cuda big=256 mid=64 one=1 reps=30 many=100 warm=5 epochs=1 iters=10 copies=8
  tiny=() img=()
fi

# seconds each step needs, for the budget
declare -A estimate=([tests]=60 [sdpa]=30 [eager]=150 [profile]=40 [compile]=150 [cudagraphs]=90 [train]=200)

run() {   # a command, stopped where the budget ends
  local left=$((deadline - SECONDS))
  if [ "$left" -le 5 ]; then echo "(not run, the budget is spent: $*)"; return 0; fi
  timeout "${left}s" "$@" || { local code=$?; echo "(exit $code from: $*)"; echo "$*" >> "$failed"; }
}

bench() {   # timm-evit bench, bf16, fused attention; MODEL [EVIT KWARG ...] -- [BENCH OPTION ...]
  local model=$1 kwargs=() ; shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do kwargs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  run "$python" -m timm_evit bench --model "$model" --model-kwargs "${tiny[@]}" "${kwargs[@]}" \
    --device "$device" --dtype bf16 --attn fused --keep-rates 0.7,0.5 --warmup "$warm" "$@"
}

step_tests() {
  run "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
}

step_sdpa() {
  run "$python" benchmarks/gpu_sdpa.py --device "$device" --dtype bf16 --batch-size "$mid" --keep-rate 0.7 \
    --repeats "$many" "${img[@]}"
}

step_eager() {   # goal 1: both fusions, DeiT-S ('class') and SigLIP B/16 ('pool'); batch 1 latency with the first
  local batch latency=()
  for batch in "$big" "$mid"; do
    bench evit_deit_small -- --batch-size "$batch" --repeats "$reps" "${latency[@]}"
    bench evit_deit_small_patch16_224 -- --batch-size "$batch" --repeats "$reps" "${latency[@]}"
    bench evit_vit_base_patch16_siglip_224 -- --batch-size "$batch" --repeats "$reps" "${latency[@]}"
    bench evit_vit_base_patch16_siglip_224 fusion=paper -- --batch-size "$batch" --repeats "$reps" "${latency[@]}"
    latency=(--no-latency)
  done
}

step_profile() {
  run "$python" benchmarks/gpu_profile.py --device "$device" --dtype bf16 --keep-rate 0.5 \
    --batch-sizes "$big,$one" --iters "$iters" "${img[@]}"
}

step_compile() {   # goal 2: inductor, against timm's model compiled the same way
  bench evit_deit_small -- --batch-size "$big" --repeats "$reps" --compile --no-latency
  bench evit_deit_small_patch16_224 -- --batch-size "$big" --repeats "$reps" --compile --no-latency
}

step_cudagraphs() {   # goal 2: batch 1 behind an API, CUDA graphs (fixed keep rates)
  bench evit_vit_base_patch16_siglip_224 -- --batch-size "$one" --repeats "$many" --compile reduce-overhead \
    --no-latency
}

step_train() {   # goal 4: timm's train.py and validate.py, EViT beside timm's model
  if [ -z "${TIMM_SCRIPTS:-}" ] || [ ! -f "$TIMM_SCRIPTS/train.py" ] || [ ! -f "$TIMM_SCRIPTS/validate.py" ]; then
    echo "(not run: TIMM_SCRIPTS must name a folder holding timm's train.py and validate.py)"; return 0
  fi
  local work data model name args
  work=$(mktemp -d) data=$work/cluttered_digits
  run "$python" examples/cluttered_digits.py --out "$data" --copies "$copies" --test-copies "$copies" \
    > "$work/data.log" 2>&1
  tail -2 "$work/data.log"
  if [ ! -d "$data/test" ]; then rm -rf "$work"; return 0; fi   # (the failure is written down above)
  args=(img_size=64 patch_size=8 embed_dim=96 depth=6 num_heads=3)
  amp=(--amp --amp-dtype bfloat16 --torchcompile); [ "$device" = cpu ] && amp=()
  for model in deit_tiny_patch16_224 evit_deit_tiny; do
    name=$model; [ "$model" = evit_deit_tiny ] && name=evit
    local evit=(); [ "$model" = evit_deit_tiny ] && evit=("reorg_layers=(1,3,5)" keep_rate=0.7)
    run "$python" "$TIMM_SCRIPTS/train.py" --data-dir "$data" --model "$model" --model-kwargs "${args[@]}" "${evit[@]}" \
      --num-classes 10 --input-size 3 64 64 --crop-pct 1.0 --no-aug --opt adamw --lr 1e-3 --weight-decay 0.05 \
      --sched cosine --warmup-epochs 0 \
      --epochs "$epochs" -b 256 --workers 4 --device "$device" "${amp[@]}" --seed 0 --output "$work/runs" \
      --experiment "$name" --log-interval 10 > "$work/$name.log" 2>&1
    echo "### train.py, $model"; grep -E "Train: |Test: \[ *[0-9]+/[0-9]+\]  Time|\*\*\*|Error|error" "$work/$name.log" | tail -8
    run "$python" "$TIMM_SCRIPTS/validate.py" --data-dir "$data" --split test --model "$model" \
      --model-kwargs "${args[@]}" "${evit[@]}" --num-classes 10 --input-size 3 64 64 --crop-pct 1.0 -b 256 \
      --workers 4 --device "$device" "${amp[@]}" --checkpoint "$work/runs/$name/last.pth.tar" > "$work/$name.val.log" 2>&1
    echo "### validate.py, $model"; grep -E "Test: \[|\* Acc|Error|error" "$work/$name.val.log" | tail -3
  done
  rm -rf "$work"
}

{
  echo "# benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__)"
} > "$results" 2>&1

for step in $steps; do
  if ! declare -F "step_$step" > /dev/null; then echo "unknown step $step" | tee -a "$results"; exit 2; fi
  left=$((deadline - SECONDS))
  if [ "$left" -lt "${estimate[$step]}" ]; then
    printf '\n## %s\n\n(skipped: %s s of the budget left, the step needs about %s; run it again by name)\n' \
      "$step" "$left" "${estimate[$step]}" | tee -a "$results"
    continue
  fi
  start=$SECONDS
  printf '\n## %s\n\n' "$step" | tee -a "$results"
  "step_$step" 2>&1 | tee -a "$results"
  printf '\n(%s: %s s)\n' "$step" "$((SECONDS - start))" | tee -a "$results"
done
if [ -s "$failed" ]; then
  printf '\n%s command(s) failed (above)\n' "$(wc -l < "$failed")" | tee -a "$results"
  exit 1
fi
