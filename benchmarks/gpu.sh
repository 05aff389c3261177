#!/usr/bin/env bash
# The GPU checks and rows of BENCHMARKS.md ("GPU"), in the order they matter, one file per step.
# Usage: benchmarks/gpu.sh OUT_DIR [STEP ...]   (steps: tests profile eager dinov2 cudagraphs
# compile dinov2-compile; default: all). Needs a CUDA GPU, torch, timm and this package importable.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [STEP ...]}
shift
steps=${*:-tests profile eager dinov2 cudagraphs compile dinov2-compile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
bench() { python3 -m timm_evit bench --device cuda --attn fused "$@"; }
dino=(--model vit_small_patch14_reg4_dinov2.lvd142m)   # timm's DINOv2-S/14 with registers, 518 px

for step in $steps; do
  echo "== $step"
  case $step in
    tests)  # the same function as on the CPU, and no host-device synchronisation in forward
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 ;;
    profile)  # kernel time by operator, plain against EViT, batch 256 and 1
      python3 benchmarks/gpu_profile.py ;;
    eager)
      for dtype in fp32 bf16; do
        bench --model evit_deit_small --keep-rates 1,0.7,0.5 --dtype $dtype --batch-size 256 --repeats 30 --warmup 5
        bench --model evit_deit_small --keep-rates 1,0.7,0.5 --dtype $dtype --batch-size 64 --repeats 30 --warmup 5 --no-latency
      done ;;
    dinov2)
      for dtype in fp32 bf16; do
        bench "${dino[@]}" --keep-rates 0.7,0.5 --dtype $dtype --batch-size 256 --repeats 10 --warmup 3
        bench "${dino[@]}" --keep-rates 0.7,0.5 --dtype $dtype --batch-size 64 --repeats 10 --warmup 3 --no-latency
      done ;;
    compile)
      bench --model evit_deit_small --keep-rates 0.7,0.5 --dtype bf16 --batch-size 256 --repeats 30 --compile
      bench --model evit_deit_small --keep-rates 0.7,0.5 --dtype bf16 --batch-size 64 --repeats 30 --compile --no-latency ;;
    cudagraphs)  # batch 1 behind an API: CUDA graphs take the launch cost away
      bench --model evit_deit_small --keep-rates 0.7,0.5 --dtype bf16 --batch-size 1 --repeats 100 --compile reduce-overhead --no-latency ;;
    dinov2-compile)
      bench "${dino[@]}" --keep-rates 0.7,0.5 --dtype bf16 --batch-size 256 --repeats 10 --compile ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac 2>&1 | tee "$out/$step.md"
done
