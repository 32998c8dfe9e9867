#!/usr/bin/env bash
# The H200 tuning of the DeepSeek-V3.2 spec, in phases that can be run separately.
#   benchmarks/h200_tune_v32.sh quality OUT   exhaustive grid vs TPE on sparse attention (docs/tuning.md)
#   benchmarks/h200_tune_v32.sh tune OUT      every kernel at S {1024,4096} x SKV {8192,32768,131072}
#                                              (TPE, TRIALS=16 per study, seeded by the default schedule)
#   benchmarks/h200_tune_v32.sh bench OUT     dsagen bench at those shapes (table, JSON, PNG)
#   benchmarks/h200_tune_v32.sh decode OUT    the serving spec's decode kernels at the reference
#                                              shapes: paged indexer and sparse decode at B=128 x 32K,
#                                              decode top-k at B=2 x 128K and B=128 x 32K
# Studies go to benchmarks/results/h200-tuning.journal (resumable: run a phase again), winners to
# autotune_db/nvidia-h200.json (the shipped database); both are also copied to OUT at the end.
set -euo pipefail
phase=${1:?phase: quality, tune, bench or decode}
out=${2:?output directory}
mkdir -p "$out"
spec=specs/deepseek_v32.toml
journal=benchmarks/results/h200-tuning.journal
db=autotune_db/nvidia-h200.json
trap 'cp -f "$journal" "$db" "$out/" 2>/dev/null || true' EXIT
common=(--storage "$journal" --db "$db" --jobs "${JOBS:-12}")
case "$phase" in
  quality)
    python3 cli.py tune "$spec" -k sparse_attention --S 4096 --SKV 8192 --sampler grid "${common[@]}" \
      --timeout "${GRID_TIMEOUT:-330}" 2>&1 | tee "$out/quality-grid.log" | tail -3
    python3 cli.py tune "$spec" -k sparse_attention --S 4096 --SKV 8192 --sampler tpe --trials "${TPE_TRIALS:-49}" \
      "${common[@]}" --timeout 200 2>&1 | tee "$out/quality-tpe.log" | tail -3 ;;
  tune)
    # shapes: the v32 set, or SHAPE_ARGS="--S 1024 --SKV 8192 --SKV 32768 --SKV 131072" for part of it;
    # kernels: all, or KERNEL_ARGS="-k topk" for some
    # shellcheck disable=SC2086
    python3 cli.py tune "$spec" ${KERNEL_ARGS:-} ${SHAPE_ARGS:---shapes v32} --sampler tpe --trials "${TRIALS:-16}" --timeout "${STUDY_TIMEOUT:-45}" \
      "${common[@]}" 2>&1 | tee "$out/tune.log" | grep -v "trial " ;;
  bench)
    python3 cli.py bench "$spec" --shapes v32 --out "$out" 2>&1 | tee "$out/bench.log" ;;
  decode)
    serving=specs/deepseek_v32_serving.toml
    tune_decode() {
      python3 cli.py tune "$serving" "$@" --sampler tpe --trials "${TRIALS:-16}" --timeout "${STUDY_TIMEOUT:-90}" \
        "${common[@]}" 2>&1 | tee -a "$out/tune-decode.log" | grep -v "trial "
    }
    tune_decode -k paged_indexer -k sparse_decode --S 128 --SKV 32768
    tune_decode -k decode_topk --S 2 --SKV 131072
    tune_decode -k decode_topk --S 128 --SKV 32768 ;;
  *) echo "unknown phase $phase: quality, tune, bench or decode" >&2; exit 2 ;;
esac
