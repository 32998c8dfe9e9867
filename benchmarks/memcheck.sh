#!/usr/bin/env bash
# On a CUDA machine: run test suites under compute-sanitizer's memcheck and record the result.
#   benchmarks/memcheck.sh OUT decode     the decode kernels' tests (paged indexer, decode top-k, sparse decode,
#                                         cache write, the decode step, the out-of-range index tests)
#   benchmarks/memcheck.sh OUT prefill    the prefill kernels' tests (indexer, top-k, sparse attention incl. the
#                                         Gluon kernels, varlen windows, the out-of-range index tests)
#   benchmarks/memcheck.sh OUT training   the backward kernels' tests (sparse attention backward, indexer loss)
# Extra arguments go to pytest (say -k 'not slow'). PyTorch's caching allocator is switched off, so every
# tensor is its own allocation and a read one element past a tensor is an error memcheck sees (with the
# cache on, it would land inside a larger pooled block and pass unseen). Writes OUT/memcheck-SUITE.log
# (pytest's output and every sanitizer report) and OUT/memcheck-SUITE.txt (versions, command, summary).
set -uo pipefail
out=${1:?output directory}
suite=${2:?suite: decode, prefill or training}
shift 2
case "$suite" in
  decode) files="tests/test_paged_indexer.py tests/test_decode_topk.py tests/test_sparse_decode.py
                 tests/test_mla_cache_write.py tests/test_decode_step.py tests/test_memory_safety.py" ;;
  prefill) files="tests/test_kernels.py tests/test_sparse_attention_gluon.py tests/test_varlen.py
                  tests/test_memory_safety.py" ;;
  training) files="tests/test_sparse_attention_bwd.py tests/test_indexer_loss.py" ;;
  *) echo "unknown suite $suite: decode, prefill or training" >&2; exit 2 ;;
esac
mkdir -p "$out"
log="$out/memcheck-$suite.log"
summary="$out/memcheck-$suite.txt"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 DSAGEN_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
# shellcheck disable=SC2086
command=(compute-sanitizer --tool memcheck --target-processes all --error-exitcode 86 --print-limit 50
         python3 -m pytest -q -p no:cacheprovider -p no:warnings $files "$@")
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sed 's/^/gpu /'
  compute-sanitizer --version | tail -1
  python3 benchmarks/versions.py
  echo "command PYTORCH_NO_CUDA_MEMORY_CACHING=1 DSAGEN_TEST_DEVICE=cuda ${command[*]}"
} > "$summary"
start=$SECONDS
"${command[@]}" > "$log" 2>&1
status=$?
{
  echo "exit status $status (86: memcheck found an error; 1: a test failed; 0: clean) in $((SECONDS - start)) s"
  grep -E "ERROR SUMMARY|passed|failed" "$log" | tail -3
} >> "$summary"
cat "$summary"
exit "$status"
