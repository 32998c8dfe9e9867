#!/usr/bin/env bash
# A before/after pair of `dsagen bench` on one GPU in one run: two checkouts of dsagen (BEFORE and
# AFTER, each a source tree with the same autotune_db/), timed in turns (before, after, before,
# after) so that the run-to-run spread is measured beside the difference.
#   benchmarks/before_after.sh BEFORE AFTER OUT
# Shapes: the V3.2 prefill stages at S=4096 x SKV {8192, 32768}, the training backward at S=4096 x
# SKV=8192, the decode kernels at B=128 x 32K. Then benchmarks/compare_bench.py writes OUT/compare.md.
set -euo pipefail
before=$(cd "${1:?before tree}" && pwd); after=$(cd "${2:?after tree}" && pwd); out=$(mkdir -p "${3:?out}" && cd "$3" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
bench() {  # bench TREE TAG
  (cd "$1" && export PYTHONPATH="$1:${PYTHONPATH:-}" &&
   python3 cli.py bench specs/deepseek_v32.toml -k indexer -k topk -k sparse_attention --S 4096 --SKV 8192 --SKV 32768 \
     --no-dense --out "$out/$2/prefill" &&
   python3 cli.py bench specs/deepseek_v32_training.toml -k sparse_attention_bwd --S 4096 --SKV 8192 --no-dense \
     --out "$out/$2/training" &&
   python3 cli.py bench specs/deepseek_v32_serving.toml -k paged_indexer -k decode_topk -k sparse_decode --S 128 \
     --SKV 32768 --no-dense --out "$out/$2/decode") > "$out/$2.log" 2>&1 || { tail -20 "$out/$2.log"; return 1; }
}
for round in ${ROUNDS:-1 2}; do
  bench "$before" "before-$round"
  bench "$after" "after-$round"
done
python3 "$here/compare_bench.py" "$out" > "$out/compare.md"
cat "$out/compare.md"
