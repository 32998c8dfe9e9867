#!/usr/bin/env bash
# On the H200: the checks that need a GPU, in one command per phase, results under OUT.
#   benchmarks/h200_verify.sh tests OUT     the whole test suite on CUDA (both backends: Triton, TVM cuda)
#   benchmarks/h200_verify.sh bench OUT     reference shapes (tuned Triton), TVM cuda at V3.2 shapes,
#                                           fused indexer + top-k against indexer-then-top-k (32K, 128K)
#   benchmarks/h200_verify.sh profile OUT   Nsight Compute sections of each kernel's tuned launch (text)
#   benchmarks/h200_verify.sh profile-decode OUT   the same for the decode kernels (serving spec)
# tests and bench need optuna and apache-tvm importable (pip install -e '.[tvm]'); run from the
# repository root.
set -euo pipefail
phase=${1:?phase: tests or bench}
out=${2:?output directory}
mkdir -p "$out"
spec=specs/deepseek_v32.toml
python3 benchmarks/versions.py | tee "$out/versions.txt"
case "$phase" in
  tests)
    python3 -m pytest -q -p no:warnings tests/ --ignore=tests/test_wheel.py --durations=10 2>&1 | tee "$out/pytest.log" | tail -15 ;;
  bench)
    python3 benchmarks/run_targets.py --sweep --out "$out" 2>&1 | tee "$out/targets.log" | tail -6
    python3 cli.py bench "$spec" --backend tvm --device cuda --S 4096 --SKV 8192 --SKV 32768 --no-dense --out "$out" \
      2>&1 | tee "$out/bench-tvm-cuda.log" | tail -5
    # the fused path: the per-row kernel (default) and multi-row variants (block_m > 1)
    python3 benchmarks/fused_indexer_topk.py --out "$out" --schedule '{"block_m": 1}' \
      --schedule '{"block_m": 16, "block_h": 1, "block_n": 64, "num_warps": 8}' \
      --schedule '{"block_m": 4, "block_h": 4, "block_n": 64, "num_warps": 4, "candidates": 256}' \
      2>&1 | tee "$out/fused.log" | tail -8 ;;
  profile)
    for kernel in sparse_attention topk indexer indexer_topk; do
      ncu --target-processes all -k "regex:_${kernel}(_resident)?_kernel" -s 3 -c 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/profile_kernel.py "$kernel" > "$out/ncu-$kernel.txt" 2>&1 || echo "ncu $kernel failed" 
      grep -E "Duration|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" "$out/ncu-$kernel.txt" | head -8
    done ;;
  profile-decode)
    # the decode kernels at their reference shapes: sparse decode, the paged indexer, and every
    # launch of one decode top-k call (its split passes and its finish)
    # "kernel skip count": profile_kernel.py calls each 4 times; the decode top-k is 4 launches per call
    for what in "sparse_decode 3 1" "paged_indexer 3 1" "decode_topk 12 4"; do
      read -r kernel skip count <<< "$what"
      ncu --target-processes all -k "regex:_${kernel}" -s "$skip" -c "$count" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/profile_kernel.py "$kernel" > "$out/ncu-$kernel.txt" 2>&1 || echo "ncu $kernel failed"
      grep -E "^  _|Duration|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" \
        "$out/ncu-$kernel.txt" | head -24 || echo "ncu $kernel: no kernel profiled"
    done ;;
  *) echo "unknown phase $phase: tests, bench, profile or profile-decode" >&2; exit 2 ;;
esac
