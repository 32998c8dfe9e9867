#!/usr/bin/env bash
# The tuning of the DeepSeek-V3.2 specs on the GPU this runs on, in phases that can be run separately.
#   benchmarks/tune_v32.sh quality OUT    exhaustive grid vs TPE on sparse attention (docs/tuning.md)
#   benchmarks/tune_v32.sh tune OUT       indexer and top-k at S {1024,4096} x SKV {8192,32768,131072}
#                                          (TPE, TRIALS=16 per study, seeded by the default schedule);
#                                          SHAPE_ARGS / KERNEL_ARGS narrow it
#   benchmarks/tune_v32.sh attention OUT  sparse attention's split Gluon variant (gluon_split) at 128,
#                                          64 and 32 heads, S=4096 x SKV {8192, 32768}, S=1024 x SKV 8192
#   benchmarks/tune_v32.sh bench OUT      dsagen bench at the v32 shapes (table, JSON, PNG)
#   benchmarks/tune_v32.sh decode OUT     the serving spec's decode kernels at the reference shapes:
#                                          paged indexer and sparse decode at B=128 x 32K, decode top-k at
#                                          B=2 x 128K and B=128 x 32K
# The GPU type comes from torch (nvidia-h100, nvidia-h200, ...). Studies go to
# benchmarks/results/<type>-tuning.journal (resumable: run a phase again), winners to
# autotune_db/<type>.json (the shipped database); both are also copied to OUT at the end.
set -euo pipefail
phase=${1:?phase: quality, tune, attention, bench or decode}
out=${2:?output directory}
mkdir -p "$out"
gpu=$(python3 -c 'import torch; from dsagen.gpus import gpu_type_from_device_name as t; print(t(torch.cuda.get_device_name()))')
spec=specs/deepseek_v32.toml
journal=benchmarks/results/${gpu#nvidia-}-tuning.journal
db=autotune_db/$gpu.json
trap 'cp -f "$journal" "$db" "$out/" 2>/dev/null || true' EXIT
common=(--storage "$journal" --db "$db" --jobs "${JOBS:-12}")
# a copy of the V3.2 spec with other attention head counts and pinned knobs (same math otherwise)
variant() {  # variant HEADS PINS -> path of the spec file
  local path="$out/deepseek_v32_h$1.toml"
  sed -e "s/^heads = 128$/heads = $1/" "$spec" > "$path"
  printf '\n[schedule.sparse_attention]\n%s\n' "$2" >> "$path"
  echo "$path"
}
case "$phase" in
  quality)
    python3 cli.py tune "$spec" -k sparse_attention --S 4096 --SKV 8192 --sampler grid "${common[@]}" \
      --timeout "${GRID_TIMEOUT:-330}" 2>&1 | tee "$out/quality-grid.log" | tail -3
    python3 cli.py tune "$spec" -k sparse_attention --S 4096 --SKV 8192 --sampler tpe --trials "${TPE_TRIALS:-49}" \
      "${common[@]}" --timeout 200 2>&1 | tee "$out/quality-tpe.log" | tail -3 ;;
  tune)
    # shellcheck disable=SC2086
    python3 cli.py tune "$spec" ${KERNEL_ARGS:--k indexer -k topk} ${SHAPE_ARGS:---shapes v32} --sampler tpe \
      --trials "${TRIALS:-16}" --timeout "${STUDY_TIMEOUT:-45}" "${common[@]}" 2>&1 | tee "$out/tune.log" | grep -v "trial " ;;
  attention)
    for heads in ${HEADS:-128 64 32}; do
      s=$(variant "$heads" "${PINS:-variant = \"gluon_split\"
block_n = 64
num_stages = 2}")
      for shape in "--S 4096 --SKV 8192 --SKV 32768" "--S 1024 --SKV 8192"; do
        # shellcheck disable=SC2086
        python3 cli.py tune "$s" -k sparse_attention $shape --sampler grid --timeout "${STUDY_TIMEOUT:-60}" \
          "${common[@]}" 2>&1 | tee -a "$out/tune-attention.log" | grep -v "trial "
      done
    done ;;
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
  *) echo "unknown phase $phase: quality, tune, attention, bench or decode" >&2; exit 2 ;;
esac
